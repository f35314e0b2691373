"""Rules of the DARTS-family search strategies that a mutation audit could break unseen:
the settings each strategy refuses (and the message that names them), the defaults that
are documented (few-shot's split epoch and first edge, the learning rate an implicit or
unrolled zero-order step reads), the Neumann series term by term, the mean-shift
kernel's standardisation, the zero-order steps on a plateau, the few-shot and RLNAS
state that a resumed run needs, and the validation batch every bilevel strategy needs.
Each test replays the rule by hand on a tiny example (float64 where numbers matter)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy

from diffnas.arch import ArchParams
from diffnas.strategies import ClassificationObjective, create_strategy
from diffnas.strategies.hypergrad import grads
from diffnas.strategies.implicit import implicit, neumann_inverse_hvp
from diffnas.strategies.mean_shift import mean_shift, standardized
from diffnas.strategies.random_labels import angle_from_sums
from diffnas.strategies.zero_order import gld_step, rs_step

F64 = torch.float64
NB201 = {"name": "nb201", "C": 4, "N": 1}
RL = {"name": "random_labels", "population": 4, "iterations": 1, "parents": 2}


def _strategy(section: dict, epochs: int, space=None):
    """A strategy over the tiny space for a run of ``epochs`` (tiny_strategy's is 2)."""
    torch.manual_seed(0)
    space = space or tiny_space()
    return create_strategy(section, space.build_supernet(), ArchParams(space),
                           ClassificationObjective(), epochs=epochs)


def _nb201():
    from test_family_smoke import nb201_space

    return nb201_space()


# --- settings refused, with the key named -------------------------------------------------
@pytest.mark.parametrize("section, match", [
    ({"name": "darts", "order": 2, "fd_radius": 0.0}, r"fd_radius must be finite and > 0"),
    ({"name": "darts", "order": 2, "fd_radius": -1e-3}, r"fd_radius must be finite and > 0"),
    ({"name": "gdas", "order": 3}, r"search\.strategy\.order must be 1 or 2, got 3"),
    ({"name": "gdas", "order": 1, "hessian": "exact"}, r"hessian='exact' only applies to order=2"),
    ({"name": "gdas", "order": 2, "w_optim": {"name": "adam"}}, r"w_optim\.name=adam use"),
    ({"name": "mean_shift", "temperature": 0.0}, r"temperature > 0"),
    ({"name": "mean_shift", "bandwidth": -0.1}, r"bandwidth >= 0"),
    ({"name": "snas", "cost_weight": -0.5}, r"search\.strategy\.cost_weight must be finite and "
                                            r">= 0, got -0\.5"),
    ({**RL, "population": 1, "parents": 1}, r"population >= 2"),
    ({**RL, "population": 4, "parents": 5}, r"1 <= parents <= population, got 4, 5"),
    ({**RL, "mutate_prob": 1.5}, r"mutate_prob in \[0, 1\]"),
    ({**RL, "mutate_prob": -0.1}, r"mutate_prob in \[0, 1\]"),
    ({**RL, "iterations": -1}, r"iterations >= 0"),
])
def test_settings_that_cannot_hold_are_refused_naming_the_key(section, match):
    """A strategy's config refuses what its rule cannot use, whatever the strategy's
    subclass (gdas is darts' config plus a relaxation check)."""
    from diffnas.strategies import strategy_config

    with pytest.raises(ValueError, match=match):
        strategy_config(section)


def test_a_zero_order_config_built_in_python_refuses_an_infinite_mu():
    """(Config files are checked for finite numbers before; the dataclass checks too.)"""
    from diffnas.strategies.zero_order import ZeroOrderConfig

    with pytest.raises(ValueError, match=r"search\.strategy\.mu must be finite, got inf"):
        ZeroOrderConfig(mu=math.inf)


@pytest.mark.parametrize("relaxation", ["gumbel", "hard_gumbel"])
def test_snas_takes_either_gumbel_relaxation(relaxation):
    s = tiny_strategy({"name": "snas", "relaxation": {"name": relaxation, "tau": 1.0}})
    assert s.relaxation.hard == (relaxation == "hard_gumbel")
    stats = s.step(tiny_batch(4, 1), None)
    assert math.isfinite(stats["loss"])


@pytest.mark.parametrize("section", [
    {"name": "darts"}, {"name": "darts", "order": 2}, {"name": "gdas"},
    {"name": "implicit", "K": 2}, {"name": "zero_order", "samples": 1},
    {"name": "mean_shift", "samples": 2}, {"name": "few_shot", "split_epoch": 1},
], ids=lambda s: "_".join(str(v) for v in s.values()))
def test_a_bilevel_strategy_refuses_a_missing_validation_batch(section):
    """Bilevel strategies learn alpha on a validation batch: none is an error naming the
    strategy (gdas's, not the darts step it reuses), and nothing moves (silently skipping
    the alpha step would train the weights alone)."""
    s = tiny_strategy(section)
    alphas = [a.detach().clone() for a in s.alphas()]
    weights = copy.deepcopy(s.supernet.state_dict())
    with pytest.raises(ValueError, match=rf"^{section['name']} needs a validation batch"):
        s.step(tiny_batch(4, 1), None)
    assert all(torch.equal(a, b) for a, b in zip(s.alphas(), alphas, strict=True))
    for n, w in s.supernet.state_dict().items():
        assert torch.equal(w, weights[n]), n


@pytest.mark.parametrize("settings, traits", [
    ({}, (True, True)),
    ({"penalties": [{"name": "t_linear", "scale": 1.0}]}, (True, False)),
    ({"edge_norm": True}, (True, False)),
    ({"relaxation": {"name": "gumbel"}}, (True, False)),
    ({"order": 2}, (False, False)),
])
def test_darts_declares_a_cuda_graph_only_for_a_plain_first_order_softmax_search(settings,
                                                                                 traits):
    """(first_order, graph_safe): a captured graph replays fixed Python values, so a
    penalty's settings, edge normalisation's index lists or a sampled relaxation rule
    one out, and the unrolled rule takes second derivatives."""
    from test_hypergrad import _linear_penalty

    from diffnas.strategies import strategy_class, strategy_config

    _linear_penalty()  # registers t_linear
    section = {"name": "darts", **settings}
    assert strategy_class(section).declared(strategy_config(section)) == traits


# --- implicit: the Neumann series and its step size ---------------------------------------
@pytest.mark.parametrize("K", [1, 2, 4])
def test_the_neumann_series_has_K_terms_and_K_minus_1_hessian_products(K):
    """eta * sum_{k<K} (I - eta H)^k v, with the matrix powers taken explicitly."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    H = q @ torch.diag(torch.linspace(0.3, 1.7, 5, dtype=F64)) @ q.T
    v = torch.randn(5, generator=g, dtype=F64)
    eta = 0.6
    calls = []

    def hvp(p):
        calls.append(1)
        return [H @ p[0]]

    (got,) = neumann_inverse_hvp(hvp, [v], K, eta)
    M = torch.eye(5, dtype=F64) - eta * H
    want = eta * sum(torch.linalg.matrix_power(M, k) @ v for k in range(K))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(calls) == K - 1


def test_the_neumann_series_refuses_no_terms():
    with pytest.raises(ValueError, match="needs K >= 1 terms, got 0"):
        neumann_inverse_hvp(lambda p: p, [torch.ones(2)], 0, 0.1)


def test_implicit_eta_defaults_to_the_current_weight_learning_rate():
    """eta None: the weight optimizer's learning rate now (after its schedule moved it),
    not the configured starting one."""
    s = tiny_strategy({"name": "implicit", "K": 3}, dtype=F64)
    s.w_optimizer.param_groups[0]["lr"] = 0.07  # as a cosine schedule would move it
    assert s.config.w_optim.lr != 0.07
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    got, _ = implicit(s, train, val, K=3)
    now, _ = implicit(s, train, val, K=3, eta=0.07)
    start, _ = implicit(s, train, val, K=3, eta=s.config.w_optim.lr)
    for a, b in zip(got, now, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(got, start))


# --- single level ----------------------------------------------------------------------
def test_single_level_steps_use_each_batch_s_own_gradient():
    """A second step moves the weights along the second batch's (clipped) gradient
    alone: gradients of the first step are not carried over."""
    plain = {"name": "single_level", "w_optim": {"momentum": 0.0, "weight_decay": 0.0,
                                                 "grad_clip": 1e9, "lr": 0.1}}
    s = tiny_strategy(plain, dtype=F64)
    s.step(tiny_batch(4, 1, F64), None)
    w1 = [p.detach().clone() for p in s.supernet.parameters()]
    b2 = tiny_batch(4, 2, F64)
    loss, _ = s.loss(b2, s.arch_weights().detach())
    g = grads(loss, list(s.supernet.parameters()))
    s.step(b2, None)
    for p, p1, gi in zip(s.supernet.parameters(), w1, g, strict=True):
        torch.testing.assert_close(p.detach(), p1 - 0.1 * gi, rtol=1e-10, atol=1e-12)


class _Regularized(ClassificationObjective):
    """Cross-entropy plus, with ``regularize``, a weight regularizer of the outputs (as a
    language model's AR/TAR terms)."""

    has_regularizers = True

    def __call__(self, output, batch, regularize=False):
        loss, stats = super().__call__(output, batch)
        return (loss + 0.5 * output.pow(2).mean() if regularize else loss), stats


def test_single_level_trains_on_the_loss_with_the_objective_s_regularizers():
    """Single level has one loss, the weight step's: it includes the objective's weight
    regularizers (AR/TAR of language models)."""
    section = {"name": "single_level", "w_optim": {"momentum": 0.0, "weight_decay": 0.0,
                                                   "grad_clip": 1e9, "lr": 0.1}}
    torch.manual_seed(0)
    space = tiny_space()
    s = create_strategy(section, space.build_supernet().to(F64), ArchParams(space).to(F64),
                        _Regularized(), epochs=2)
    batch = tiny_batch(4, 1, F64)
    w0 = [p.detach().clone() for p in s.supernet.parameters()]
    loss, _ = s.loss(batch, s.arch_weights().detach(), regularize=True)
    plain, _ = s.loss(batch, s.arch_weights().detach())
    assert float(loss.detach()) > float(plain.detach())
    g = grads(loss, list(s.supernet.parameters()))
    s.step(batch, None)
    for p, p0, gi in zip(s.supernet.parameters(), w0, g, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * gi, rtol=1e-10, atol=1e-12)


# --- zero order --------------------------------------------------------------------------
@pytest.mark.parametrize("step", [rs_step, gld_step])
def test_rs_and_gld_stay_put_on_a_plateau(step):
    """A candidate is taken only when it is strictly better: on a flat objective alpha
    does not random-walk."""
    x = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    assert torch.equal(step(lambda y: 3.0, x, 0.5, 5), x)


def test_the_unrolled_zero_order_objective_steps_at_the_current_learning_rate():
    """unroll: w' = w - lr grad_w L_train with the weight optimizer's learning rate now
    (after its schedule moved it)."""
    s = tiny_strategy({"name": "zero_order", "unroll": True}, dtype=F64)
    s.w_optimizer.param_groups[0]["lr"] = 0.4
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    got = s.objective_at(train, val)(s._flat())
    aw = s.arch_weights()
    named = dict(s.supernet.named_parameters())
    g = grads(s.loss(train, aw)[0], list(named.values()))
    params = {n: (p - 0.4 * gi).detach() for (n, p), gi in zip(named.items(), g)}
    with torch.no_grad():
        want = float(s.loss(val, aw, params=params)[0])
    assert got == pytest.approx(want, rel=1e-12)


# --- mean shift --------------------------------------------------------------------------
def test_standardized_losses_have_mean_zero_and_unit_mean_square():
    """z = (L - mean) / std with the samples' own (population) spread, so a temperature
    means the same for any number of samples; equal losses give z = 0, not NaN."""
    L = torch.tensor([2.0, 2.5, 4.0, 1.0], dtype=F64)
    z = standardized(L)
    mean = L.sum() / 4
    spread = math.sqrt(float(((L - mean) ** 2).sum()) / 4)
    torch.testing.assert_close(z, (L - mean) / spread, rtol=1e-12, atol=1e-12)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float((z * z).mean()) == pytest.approx(1.0, rel=1e-12)
    assert torch.equal(standardized(torch.full((3,), 7.0)), torch.zeros(3))


def test_mean_shift_with_equal_sample_losses_weighs_them_alike():
    """Zero bandwidth: every sample is alpha, the losses are equal, the kernel uniform:
    the shift is zero and the gradient the plain one (no NaN)."""
    x = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    loss = lambda d: ((x + d[0] - 1.0) ** 2).sum()  # noqa: E731
    shift, grad, L = mean_shift(loss, [x], 0.0, 3, 1.0)
    assert torch.equal(shift[0], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(grad[0], 2 * (x.detach() - 1.0), rtol=1e-12, atol=1e-12)


def test_a_mean_shift_step_reports_the_samples_mean_loss_and_the_shift_norm():
    section = {"name": "mean_shift", "bandwidth": 0.3, "samples": 3}
    s, ref = (tiny_strategy(section, dtype=F64) for _ in range(2))
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    torch.manual_seed(7)
    stats = s.step(train, val)
    torch.manual_seed(7)
    logits = ref.arch_params.as_dict()
    groups = list(logits)

    def loss_at(deltas):
        moved = {g: logits[g] + d for g, d in zip(groups, deltas, strict=True)}
        return ref.loss(val, ref.arch_params.normalize(ref.relaxation(moved)))[0]

    shift, _, L = mean_shift(loss_at, [logits[g] for g in groups], 0.3, 3, 1.0)
    assert len(set(L.tolist())) == 3  # three different losses: mean, min, max differ
    assert stats["val_loss"] == pytest.approx(float(L.sum()) / 3, rel=1e-12)
    norm = math.sqrt(sum(float((d * d).sum()) for d in shift))
    assert stats["shift"] == pytest.approx(norm, rel=1e-12)


# --- few shot ------------------------------------------------------------------------------
def test_few_shot_splits_the_first_edge_at_half_the_epochs_by_default():
    """split_edges []: the space's first edge; split_epoch None: epochs // 2 (5 -> 2)."""
    s = _strategy({"name": "few_shot"}, epochs=5)
    g = s.arch_params.groups()[0]
    assert s.split_rows == [(g, 0)] and s.arch_params.edges[g][0].label == "normal/n2/e0"
    assert s.split_at == 2
    for _ in range(2):
        assert not s.subnets
        s.step(tiny_batch(4, 1), tiny_batch(4, 2))
        s.end_epoch()
    assert len(s.subnets) == len(s.arch_params.candidates(g))


@pytest.mark.parametrize("max_subnets, ok", [(8, True), (7, False)])
def test_few_shot_allows_exactly_max_subnets(max_subnets, ok):
    section = {"name": "few_shot", "split_edges": ["normal/n2/e0"], "max_subnets": max_subnets}
    if ok:
        assert len(tiny_strategy(section).combos()) == 8
    else:
        with pytest.raises(ValueError, match=r"would make 8 sub-supernets \(> max_subnets=7\)"):
            tiny_strategy(section)


def test_few_shot_refuses_a_split_at_the_last_epoch():
    """A split at epochs leaves the sub-supernets no epoch: refused, epochs named."""
    with pytest.raises(ValueError, match=r"split_epoch must be in \[1, epochs\), got 2 with "
                                         r"epochs=2"):
        tiny_strategy({"name": "few_shot", "split_epoch": 2})


def _split(section=None, epochs=4):
    s = _strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1,
                   **(section or {})}, epochs=epochs)
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    s.end_epoch()
    assert s.subnets
    return s


def test_after_the_split_the_run_s_lr_supernets_and_optimizers_are_the_sub_supernets():
    """The loop reads lr, scales every weight optimizer and grows every supernet: after
    the split those are the sub-supernets' (the one-shot optimizer no longer steps), and
    the lr follows the cosine schedule over the whole run."""
    s = _split()
    assert s.supernets() == [s.supernet, *(sub.supernet for sub in s.subnets)]
    opts = s.weight_optimizers()
    assert opts[0] is s.w_optimizer and len(opts) == len(s.subnets) + 1
    assert all(o is sub.w_optimizer for o, sub in zip(opts[1:], s.subnets, strict=True))
    for _ in range(len(s.subnets)):
        s.step(tiny_batch(4, 3), tiny_batch(4, 4))
    s.end_epoch()  # the end of epoch 2 of 4
    w = s.config.w_optim
    want = w.lr_min + (w.lr - w.lr_min) * (1 + math.cos(math.pi * 2 / 4)) / 2
    assert s.lr == pytest.approx(want, rel=1e-9)
    assert s.lr == s.subnets[0].lr != s.w_optimizer.param_groups[0]["lr"]


def test_each_sub_supernet_owns_its_alphas():
    """Sub-supernets are copies: stepping one moves neither the others' alphas nor the
    one-shot ones."""
    s = _split()
    before = [[a.detach().clone() for a in sub.alphas()] for sub in s.subnets]
    own = [a.detach().clone() for a in s.alphas()]
    s.step(tiny_batch(4, 3), tiny_batch(4, 4))  # sub-supernet 0's turn
    assert any(not torch.equal(a, b) for a, b in zip(s.subnets[0].alphas(), before[0]))
    for sub, b in zip(s.subnets[1:], before[1:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(sub.alphas(), b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(s.alphas(), own, strict=True))


def test_few_shot_forgets_an_epoch_s_validation_losses_at_its_end():
    s = _split()
    for _ in range(3):
        s.step(tiny_batch(4, 3), tiny_batch(4, 4))
    assert sum(map(len, s.val_loss)) == 3
    s.end_epoch()
    assert s.val_loss == [[] for _ in s.subnets]
    assert s.state_dict()["val_loss"] == s.val_loss


def test_few_shot_resumed_before_the_split_still_splits_on_time():
    """The epoch count is part of the state: a run resumed after one of two one-shot
    epochs splits at the end of the second, as the uninterrupted run does."""
    section = {"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 2}
    s = _strategy(section, epochs=3)
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    s.end_epoch()
    assert not s.subnets
    resumed = _strategy(section, epochs=3)
    resumed.load_state_dict(copy.deepcopy(s.state_dict()))
    assert resumed.epoch == 1
    resumed.step(tiny_batch(4, 1), tiny_batch(4, 2))
    resumed.end_epoch()
    assert len(resumed.subnets) == len(resumed.arch_params.candidates("normal"))


# --- random labels -------------------------------------------------------------------------
def test_random_labels_resume_keeps_the_sample_counts_and_initial_weights():
    s = tiny_strategy(RL, space=_nb201())
    torch.manual_seed(0)
    for i in range(3):
        s.step(tiny_batch(4, i), None)
    assert sum(int(c.sum()) for c in s.counts.values()) == 3 * 6  # 6 edges a step
    resumed = tiny_strategy(RL, space=_nb201(), seed=1)
    resumed.load_state_dict(copy.deepcopy(s.state_dict()))
    for g, c in s.counts.items():
        assert torch.equal(resumed.counts[g], c)
    for n, w in s.init_weights.items():
        assert torch.equal(resumed.init_weights[n], w)


def test_mapping_the_edges_leaves_bn_statistics_and_the_rng_alone():
    s = tiny_strategy(RL, space=_nb201())
    before = {n: b.clone() for n, b in s.supernet.named_buffers()}
    assert s.supernet.training
    rng = torch.get_rng_state()
    s.map_edges(tiny_batch(4, 0)[0][:2])
    assert torch.equal(torch.get_rng_state(), rng)
    assert s.supernet.training
    for n, b in s.supernet.named_buffers():
        assert torch.equal(b, before[n]), n


def test_a_crossover_child_takes_each_edge_from_one_parent_about_half_each():
    s = tiny_strategy(RL, space=_nb201())
    a, b = {"cell": torch.full((6,), 1)}, {"cell": torch.full((6,), 2)}
    torch.manual_seed(0)
    from_a = []
    for _ in range(200):
        child = s._cross(a, b)["cell"]
        assert bool(((child == 1) | (child == 2)).all())
        from_a.append(float((child == 1).double().mean()))
    assert 0.4 < sum(from_a) / len(from_a) < 0.6


def test_the_angle_of_parallel_vectors_is_zero_despite_rounding():
    """Rounding can put <a, b> a hair above |a| |b| (cos > 1): the angle is then 0, not a
    math domain error."""
    n0, n1 = 1.0, 4.0
    assert angle_from_sums(2.0 * (1 + 2 ** -52), n0, n1) == 0.0
    assert angle_from_sums(-2.0 * (1 + 2 ** -52), n0, n1) == pytest.approx(math.pi)
    assert angle_from_sums(1.0, 1.0, 4.0) == pytest.approx(math.pi / 3)


# --- registry ------------------------------------------------------------------------------
def test_a_strategy_without_data_parallel_is_refused_for_two_processes(monkeypatch):
    from diffnas.strategies import require_data_parallel
    from diffnas.strategies.zero_order import ZeroOrderStrategy

    require_data_parallel({"name": "zero_order"}, 2)
    monkeypatch.setattr(ZeroOrderStrategy, "data_parallel", False)
    require_data_parallel({"name": "zero_order"}, 1)
    with pytest.raises(ValueError, match="strategy 'zero_order' does not run data parallel"):
        require_data_parallel({"name": "zero_order"}, 2)


# --- defaults, and few-shot sub-supernets after the split --------------------------------
def test_a_strategy_section_without_a_name_is_darts():
    """``search.strategy={order: 2}`` (a section replaced without its name) is DARTS, as
    the documented default says, for the class and the config alike."""
    from diffnas.strategies import strategy_class
    from diffnas.strategies.darts import DartsStrategy

    assert strategy_class({}) is DartsStrategy
    s = _strategy({"order": 2}, epochs=2)
    assert type(s) is DartsStrategy and s.config.order == 2


def test_a_few_shot_run_resumed_after_the_split_restores_every_sub_supernet():
    """Sub-supernets train apart after the split: a resumed run's sub-supernets hold the
    saved ones' alphas, weights and optimizer state, not fresh copies of the export."""
    s = _split(epochs=4)
    for i in range(len(s.subnets)):
        s.step(tiny_batch(4, 10 + i), tiny_batch(4, 20 + i))
    s.end_epoch()
    resumed = _strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"],
                         "split_epoch": 1}, epochs=4)
    resumed.load_state_dict(copy.deepcopy(s.state_dict()))
    assert len(resumed.subnets) == len(s.subnets)
    trained = 0
    for got, want in zip(resumed.subnets, s.subnets, strict=True):
        for a, b in zip(got.alphas(), want.alphas(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(got.supernet.parameters(), want.supernet.parameters(), strict=True):
            assert torch.equal(a, b)
        trained += any(not torch.equal(a, b) for a, b in
                       zip(want.supernet.parameters(), s.supernet.parameters(), strict=True))
        og, ow = got.w_optimizer.state_dict(), want.w_optimizer.state_dict()
        assert og["param_groups"] == ow["param_groups"]
        assert og["state"].keys() == ow["state"].keys()
        for k, st in ow["state"].items():
            assert all(torch.equal(og["state"][k][n], v) for n, v in st.items())
    assert trained == len(s.subnets) - 1  # all but the exported one differ from the export


def test_each_sub_supernet_anneals_its_own_copy_of_the_temperature_once_an_epoch():
    """A sub-supernet's relaxation is a copy of the run's: at an epoch's end every one
    (and the run's, for the exported alphas) takes one step of the anneal, as a DARTS
    run's does (a shared one would step once per sub-supernet and reach tau_min early)."""
    relax = {"name": "gumbel", "tau": 1.0, "tau_min": 0.1}
    s = _split({"relaxation": relax}, epochs=5)
    ref = _strategy({"name": "darts", "relaxation": relax}, epochs=5)
    ref.relaxation.end_epoch()  # the one-shot epoch
    for _ in range(2):
        for _ in range(len(s.subnets)):
            s.step(tiny_batch(4, 3), tiny_batch(4, 4))
        s.end_epoch()
        ref.relaxation.end_epoch()
        assert ref.relaxation.tau > relax["tau_min"]
        assert s.relaxation.tau == pytest.approx(ref.relaxation.tau, rel=1e-12)
        for sub in s.subnets:
            assert sub.relaxation.inner is not s.relaxation
            assert sub.relaxation.inner.tau == pytest.approx(ref.relaxation.tau, rel=1e-12)
