"""Second audit of the shared strategy rules (strategies/base.py, darts.py, hypergrad.py,
implicit.py, single_level.py, objective.py): the optimizer settings the docs promise (the
DARTS paper's defaults, refusals naming the key, the settings reaching the optimizers that
step), the weight step's own gradient (regularized, not carried over), the cosine schedule
down to ``lr_min``, what a step reports (training loss, and the validation loss as
``val_*``), penalties (bound to the alphas, given the current logits, added to the
single-level loss), the IFT rule with weights a loss does not use, the refusals of
relaxation and penalty sections, and the classification objective's loss and accuracy.
Each is replayed by hand on a tiny example (float64 where numbers matter)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy

from diffnas.arch import ArchParams
from diffnas.config import ConfigError
from diffnas.strategies import ClassificationObjective, create_strategy
from diffnas.strategies.base import (
    PENALTIES,
    ArchOptimConfig,
    WeightOptimConfig,
    check_penalties,
    check_relaxation,
    register_penalty,
)
from diffnas.strategies.darts import DartsConfig
from diffnas.strategies.hypergrad import first_order, grads
from diffnas.strategies.implicit import ImplicitConfig, implicit, implicit_hypergrad
from diffnas.strategies.objective import check_finite_loss

F64 = torch.float64
PLAIN_SGD = {"momentum": 0.0, "weight_decay": 0.0, "grad_clip": 1e9, "lr": 0.1, "lr_min": 0.0}


class _Regularized(ClassificationObjective):
    """Cross-entropy plus, with ``regularize``, a term of the outputs (as AR/TAR)."""

    has_regularizers = True

    def __call__(self, output, batch, regularize=False):
        loss, stats = super().__call__(output, batch)
        return (loss + 0.5 * output.pow(2).mean() if regularize else loss), stats


class _Recorder:
    """A penalty 0.01 * sum(logits) that records what it was bound to and given."""

    def __init__(self):
        self.bound = None
        self.seen = []

    def bind(self, arch_params):
        self.bound = arch_params

    def __call__(self, arch_weights, logits):
        self.seen.append(logits)
        return 0.01 * sum(v.sum() for v in logits.values())


def _recorder_penalty():
    if "t2_recorder" not in PENALTIES.names():
        register_penalty("t2_recorder")(_Recorder)
    return {"name": "t2_recorder"}


def _linear_penalty():
    from test_hypergrad import _linear_penalty as linear

    return linear()


# --- documented defaults and refusals of the optimizer settings ---------------------------
def test_the_optimizers_default_to_the_darts_paper_settings():
    """docs/strategies.md: SGD {lr 0.025, lr_min 0.001, momentum 0.9, weight_decay 3e-4,
    grad_clip 5}; Adam on the alphas {lr 3e-4, betas (0.5, 0.999), weight_decay 1e-3};
    implicit K 5, eta null (the weight lr)."""
    w = WeightOptimConfig()
    assert (w.name, w.lr, w.lr_min, w.momentum, w.weight_decay, w.grad_clip) == (
        "sgd", 0.025, 0.001, 0.9, 3e-4, 5.0)
    a = ArchOptimConfig()
    assert (a.lr, tuple(a.betas), a.weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    imp = ImplicitConfig()
    assert (imp.K, imp.eta) == (5, None)


@pytest.mark.parametrize("make, match", [
    (lambda: WeightOptimConfig(lr_min=-0.001), r"search\.strategy\.w_optim\.lr_min must be >= 0"),
    (lambda: WeightOptimConfig(momentum=-0.5), r"search\.strategy\.w_optim\.momentum must be >= 0"),
    (lambda: WeightOptimConfig(weight_decay=-1e-4),
     r"search\.strategy\.w_optim\.weight_decay must be >= 0"),
    (lambda: WeightOptimConfig(momentum=1e39), r"w_optim\.momentum must be finite and at most"),
    (lambda: WeightOptimConfig(grad_clip=0.0), r"search\.strategy\.w_optim\.grad_clip must be > 0"),
    (lambda: WeightOptimConfig(lr=0.01, lr_min=0.02),
     r"lr_min=0\.02 > lr=0\.01: the cosine schedule would raise the learning rate"),
    (lambda: ArchOptimConfig(lr=-1e-3), r"search\.strategy\.a_optim\.lr must be >= 0"),
    (lambda: ArchOptimConfig(weight_decay=-1e-3),
     r"search\.strategy\.a_optim\.weight_decay must be >= 0"),
    (lambda: ArchOptimConfig(betas=(0.5, 1.0)), r"a_optim\.betas must be two numbers in \[0, 1\)"),
    (lambda: DartsConfig(order=2, hessian="central"),
     r"search\.strategy\.hessian must be one of .*got 'central'"),
    (lambda: DartsConfig(order=2, fd_radius=math.inf), r"fd_radius must be finite and > 0"),
    (lambda: ImplicitConfig(eta=1e300), r"search\.strategy\.eta must be finite and at most"),
], ids=["lr_min", "momentum", "weight_decay", "float32", "grad_clip", "lr_min_above_lr",
        "a_lr", "a_weight_decay", "a_betas", "hessian", "fd_radius_inf", "eta_float32"])
def test_optimizer_settings_that_cannot_hold_are_refused_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    """lr_min = lr keeps the rate constant (docs), lr_min 0 decays to zero, and SGD's
    config accepts Adam's default betas written as a list (as YAML gives them)."""
    w = WeightOptimConfig(lr=0.05, lr_min=0.05)
    assert w.lr_min == w.lr
    assert WeightOptimConfig(lr_min=0.0).lr_min == 0.0
    assert WeightOptimConfig(betas=[0.9, 0.999]).betas == (0.9, 0.999)


# --- the configured settings reach the optimizers that step --------------------------------
def test_sgd_steps_with_the_configured_momentum_and_weight_decay():
    """Two weight steps replayed by hand: d = g + wd w; buf = d, then m buf + d; w -= lr buf."""
    lr, m, wd = 0.1, 0.5, 0.1
    s = tiny_strategy({"name": "darts", "w_optim": {"lr": lr, "momentum": m, "weight_decay": wd,
                                                    "grad_clip": 1e9}}, dtype=F64)
    aw = s.arch_weights().detach()
    params = list(s.supernet.parameters())
    bufs = None
    for seed in (1, 2):
        batch = tiny_batch(4, seed, F64)
        w = [p.detach().clone() for p in params]
        g = grads(s.loss(batch, aw)[0], params)
        d = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
        bufs = d if bufs is None else [m * b + di for b, di in zip(bufs, d, strict=True)]
        s.weight_step(batch, aw)
        for p, wi, b in zip(params, w, bufs, strict=True):
            torch.testing.assert_close(p.detach(), wi - lr * b, rtol=1e-10, atol=1e-12)


def test_adam_and_the_alphas_optimizer_take_the_configured_settings():
    s = tiny_strategy({"name": "darts",
                       "w_optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.02},
                       "a_optim": {"lr": 0.003, "betas": [0.7, 0.99], "weight_decay": 0.04}})
    wg = s.w_optimizer.param_groups[0]
    assert isinstance(s.w_optimizer, torch.optim.Adam)
    assert (wg["lr"], wg["weight_decay"]) == (0.01, 0.02)
    ag = s.a_optimizer.param_groups[0]
    assert (ag["lr"], tuple(ag["betas"]), ag["weight_decay"]) == (0.003, (0.7, 0.99), 0.04)


def test_the_weight_schedule_is_cosine_from_lr_down_to_lr_min():
    s = tiny_strategy({"name": "darts", "w_optim": {"lr": 0.1, "lr_min": 0.02}})
    assert s.lr == pytest.approx(0.1)
    s.w_optimizer.step()  # (no gradients: moves nothing; the schedule steps after it)
    s.end_epoch()
    assert s.lr == pytest.approx(0.06, rel=1e-9)  # halfway: (lr + lr_min) / 2
    s.end_epoch()
    assert s.lr == pytest.approx(0.02, rel=1e-9)


def test_an_epoch_s_end_anneals_the_relaxation_temperature():
    from diffnas.arch.relax import create_relaxation

    relax = {"name": "gumbel", "tau": 1.0, "tau_min": 0.1, "anneal": "linear"}
    s = tiny_strategy({"name": "darts", "relaxation": relax})
    ref = create_relaxation("gumbel", tau=1.0, tau_min=0.1, anneal="linear")
    ref.set_epochs(2)
    ref.end_epoch()
    s.w_optimizer.step()  # (no gradients: moves nothing; the schedule steps after it)
    s.end_epoch()
    assert s.relaxation.tau == pytest.approx(ref.tau) and s.relaxation.tau < 1.0


# --- the weight step -----------------------------------------------------------------------
def test_each_weight_step_follows_its_own_batch_s_regularized_gradient():
    """The weight step trains on the objective's regularized loss (AR/TAR), and a second
    step's gradient is its own batch's alone (none carried over from the first)."""
    torch.manual_seed(0)
    space = tiny_space()
    s = create_strategy({"name": "darts", "w_optim": PLAIN_SGD},
                        space.build_supernet().to(F64), ArchParams(space).to(F64),
                        _Regularized(), epochs=2)
    aw = s.arch_weights().detach()
    params = list(s.supernet.parameters())
    for seed in (1, 2):
        batch = tiny_batch(4, seed, F64)
        w = [p.detach().clone() for p in params]
        reg, _ = s.loss(batch, aw, regularize=True)
        assert float(reg.detach()) > float(s.loss(batch, aw)[0].detach())
        g = grads(reg, params)
        s.weight_step(batch, aw)
        for p, wi, gi in zip(params, w, g, strict=True):
            torch.testing.assert_close(p.detach(), wi - 0.1 * gi, rtol=1e-10, atol=1e-12)


def test_the_first_order_alpha_pass_leaves_a_frozen_weight_frozen():
    """frozen() turns off only the weights it turned off: a weight the user froze stays
    frozen after a step (and does not move)."""
    s = tiny_strategy({"name": "darts"})
    p0 = next(s.supernet.parameters())
    p0.requires_grad_(False)
    before = p0.detach().clone()
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    assert p0.requires_grad is False
    assert torch.equal(p0.detach(), before)
    assert all(p.requires_grad for p in list(s.supernet.parameters())[1:])


def test_a_supernet_holding_the_architecture_parameters_is_refused():
    torch.manual_seed(0)
    space = tiny_space()
    supernet, arch = space.build_supernet(), ArchParams(space)
    supernet.add_module("arch", arch)
    with pytest.raises(ValueError, match=r"architecture parameter\(s\) are also among the "
                                         r"supernet's weights"):
        create_strategy({"name": "darts"}, supernet, arch, ClassificationObjective(), epochs=2)


# --- what a step reports --------------------------------------------------------------------
@pytest.mark.parametrize("section", [{"name": "darts"}, {"name": "implicit", "K": 2}],
                         ids=["darts", "implicit"])
def test_a_bilevel_step_reports_the_training_loss_and_the_validation_loss_apart(section):
    """``loss``/``acc``: the weight step's, on the training batch at the moved alphas;
    ``val_loss``/``val_acc``: the alpha step's, on the validation batch before it moved."""
    s, ref = (tiny_strategy(section, dtype=F64) for _ in range(2))
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    stats = s.step(train, val)
    val_loss = ref.loss(val, ref.arch_weights())[0].item()
    rule = first_order if section["name"] == "darts" else (
        lambda r, t, v: implicit(r, t, v, K=2))
    g, _ = rule(ref, train, val)
    ref.set_alpha_grads(g)
    ref.a_optimizer.step()
    train_loss = ref.loss(train, ref.arch_weights())[0].item()
    assert stats["val_loss"] == pytest.approx(val_loss, rel=1e-12)
    assert stats["loss"] == pytest.approx(train_loss, rel=1e-12)
    assert {"acc", "val_acc"} <= set(stats)


# --- penalties ------------------------------------------------------------------------------
def test_a_penalty_is_bound_to_the_alphas_and_given_the_current_logits():
    s = tiny_strategy({"name": "darts", "penalties": [_recorder_penalty()]})
    (name, penalty), = s.penalties
    assert name == "t2_recorder" and penalty.bound is s.arch_params
    _, stats = first_order(s, tiny_batch(4, 1), tiny_batch(4, 2))
    logits = penalty.seen[-1]
    assert set(logits) == set(s.arch_params.as_dict())
    for g, v in s.arch_params.as_dict().items():
        assert logits[g] is v or torch.equal(logits[g], v)
    want = 0.01 * sum(v.sum().item() for v in s.arch_params.as_dict().values())
    assert stats["penalty_t2_recorder"] == pytest.approx(want, rel=1e-5)


def test_single_level_adds_the_penalty_to_its_one_loss():
    """The alphas' gradient is that of loss + penalty (the docs' latency penalty works with
    every strategy), and the penalty is reported."""
    s = tiny_strategy({"name": "single_level", "penalties": [_linear_penalty()]}, dtype=F64)
    batch = tiny_batch(4, 1, F64)
    aw = s.arch_weights()
    loss, _ = s.loss(batch, aw, regularize=True)
    value = s.penalties[0][1](aw, None)
    plain = grads(loss, s.alphas(), retain_graph=True)
    want = grads(loss + value, s.alphas())
    stats = s.step(batch, None)
    assert stats["penalty_t_linear"] == pytest.approx(value.item(), rel=1e-12)
    for p, w, pl in zip(s.alphas(), want, plain, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(w, pl)


def test_single_level_alpha_gradients_are_each_step_s_own():
    """A second step's alpha gradient is the second batch's alone (the first step's is not
    added to it)."""
    s = tiny_strategy({"name": "single_level"}, dtype=F64)
    s.step(tiny_batch(4, 1, F64), None)
    b2 = tiny_batch(4, 2, F64)
    want = grads(s.loss(b2, s.arch_weights(), regularize=True)[0], s.alphas())
    s.step(b2, None)
    for p, w in zip(s.alphas(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


def test_single_level_declares_first_order_and_no_cuda_graph():
    """docs/strategies.md lists single_level among the first-order strategies (bf16 and
    compile allowed); only first-order darts is graph safe."""
    from diffnas.strategies import strategy_class, strategy_config

    section = {"name": "single_level"}
    assert strategy_class(section).declared(strategy_config(section)) == (True, False)


# --- refusals of sections -------------------------------------------------------------------
def test_relaxation_and_penalty_sections_are_refused_naming_where():
    with pytest.raises(ConfigError, match=r"search\.strategy\.relaxation needs a 'name'"):
        check_relaxation({"tau": 1.0})
    with pytest.raises(ConfigError, match=r"^search\.strategy\.relaxation: .*positive"):
        check_relaxation({"name": "gumbel", "tau": -1.0})
    spec = _recorder_penalty()
    check_penalties([spec])
    with pytest.raises(ConfigError, match=r"search\.strategy\.penalties\[1\]"):
        check_penalties([spec, {**spec, "bogus": 1}])


# --- implicit: weights a loss does not use ---------------------------------------------------
def test_the_ift_hypergradient_ignores_a_weight_no_loss_uses():
    """A weight outside both losses (e.g. an op a hard sample left out) has zero gradient and
    zero Hessian row: the hypergradient is that of the problem without it."""
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.tensor([0.6, 1.0, 1.4], dtype=F64))
    B = torch.randn(3, 2, generator=g, dtype=F64)
    t = torch.randn(3, generator=g, dtype=F64)
    a = torch.randn(2, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    unused = torch.randn(4, generator=g, dtype=F64, requires_grad=True)

    def losses():
        return (0.5 * w @ A @ w - w @ B @ a, 0.5 * ((w - t) ** 2).sum() + 0.1 * (a * a).sum())

    (want,) = implicit_hypergrad(*losses(), [w], [a], 3, 0.5)
    (got,) = implicit_hypergrad(*losses(), [w, unused], [a], 3, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # by hand: g_a - B^T * (-1) * p with p = eta sum_k (I - eta A)^k (w - t), da/dw mixed = -B
    M = torch.eye(3, dtype=F64) - 0.5 * A
    p = 0.5 * sum(torch.linalg.matrix_power(M, k) @ (w - t).detach() for k in range(3))
    torch.testing.assert_close(got, 0.2 * a.detach() + B.T @ p, rtol=1e-12, atol=1e-14)


# --- the classification objective ------------------------------------------------------------
def test_the_classification_objective_reports_mean_cross_entropy_and_accuracy():
    out = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0]],
                       dtype=F64)
    y = torch.tensor([0, 2, 1, 2])  # rows 0-2 right, row 3 wrong
    loss, stats = ClassificationObjective()(out, (None, y))
    want = sum(math.log(sum(math.exp(v) for v in row)) - row[int(c)]
               for row, c in zip(out.tolist(), y, strict=True)) / 4
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert stats == {"loss": pytest.approx(want, rel=1e-12), "acc": 0.75}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_non_finite_loss_stops_the_search(value):
    with pytest.raises(FloatingPointError, match=r"loss is .* \(NaN/inf\)"):
        check_finite_loss(value)
    check_finite_loss(1e30)
