"""Rules of the search loop that a mutation audit could break: the strategy's two
optimizers (Adam on alpha with its betas and weight decay, the weights' cosine schedule),
the weight step (clipped, detached from alpha, fresh gradients each step), penalties,
the loop's epoch bookkeeping (per-epoch means, stop_after, run end, RNG and callback state
on resume), the search task's batches and its end-of-epoch evaluation, edge
normalisation in ArchParams and in the genotype, the graph engine's batches and seeds.
Each test replays the rule by hand on a tiny example rather than comparing with numbers
the code once printed."""

from __future__ import annotations

import json
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import StatelessTask, tiny_batch, tiny_space, tiny_strategy
from test_engine import _cfg
from torch import nn

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.config import ConfigError
from diffnas.engine.loop import Callback, Loop
from diffnas.engine.search import (
    SearchTask,
    evaluate_supernet,
    search_loaders,
    search_then_retrain,
)
from diffnas.spaces.base import EdgeSpec
from diffnas.strategies import ClassificationObjective, create_strategy


def _strategy(section: dict, epochs: int, dtype=torch.float64, space=None):
    torch.manual_seed(0)
    space = space or tiny_space()
    return create_strategy(section, space.build_supernet().to(dtype),
                           ArchParams(space).to(dtype), ClassificationObjective(), epochs)


# --- the optimizers and the schedule ----------------------------------------------------
def test_the_alpha_optimizer_is_adam_with_the_configured_lr_betas_and_weight_decay():
    """Two a_optimizer steps equal Adam replayed by hand (L2 weight decay added to the
    gradient, bias-corrected moments) with a_optim's lr, betas and weight_decay."""
    lr, (b1, b2), wd, eps = 0.05, (0.3, 0.8), 0.2, 1e-8
    s = _strategy({"name": "darts", "a_optim": {"lr": lr, "betas": [b1, b2],
                                                 "weight_decay": wd}}, epochs=2)
    g = torch.Generator().manual_seed(3)
    want = [p.detach().clone() for p in s.alphas()]
    m = [torch.zeros_like(p) for p in want]
    v = [torch.zeros_like(p) for p in want]
    for t in (1, 2):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in want]
        s.a_optimizer.zero_grad()
        s.set_alpha_grads(grads)
        s.a_optimizer.step()
        for i, (p, gr) in enumerate(zip(want, grads, strict=True)):
            gr = gr + wd * p
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            mh, vh = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            want[i] = p - lr * mh / (vh.sqrt() + eps)
    for got, exp in zip(s.alphas(), want, strict=True):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("w_optim, key, value", [
    ({"name": "sgd", "momentum": 0.5, "weight_decay": 0.01}, "momentum", 0.5),
    ({"name": "sgd", "momentum": 0.5, "weight_decay": 0.01}, "weight_decay", 0.01),
    ({"name": "adam", "betas": [0.7, 0.9], "weight_decay": 0.02}, "weight_decay", 0.02),
    ({"name": "adam", "betas": [0.7, 0.9], "weight_decay": 0.02}, "betas", (0.7, 0.9)),
])
def test_the_weight_optimizer_takes_its_configured_settings(w_optim, key, value):
    s = _strategy({"name": "darts", "w_optim": w_optim}, epochs=2)
    assert tuple(s.w_optimizer.param_groups[0][key]) == value if key == "betas" else \
        s.w_optimizer.param_groups[0][key] == value


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_the_logged_lr_is_the_epoch_s_own_on_a_cosine_from_lr_to_lr_min_over_the_epochs():
    """``lr`` of epoch e is lr_min + (lr - lr_min) * (1 + cos(pi e / E)) / 2, read before
    the schedule steps (the rate that epoch's steps used)."""
    lr, lr_min, epochs = 0.1, 0.02, 4
    s = _strategy({"name": "darts", "w_optim": {"lr": lr, "lr_min": lr_min}}, epochs)
    task = SearchTask(s, tiny_space(), None, None)
    for e in range(epochs):
        want = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2
        assert s.lr == pytest.approx(want, rel=1e-12)
        assert task.end_epoch(e)["lr"] == pytest.approx(want, rel=1e-12)


def test_a_weight_step_is_clipped_sgd_on_fresh_gradients_and_leaves_alpha_alone():
    """Two weight steps (no momentum, no decay) equal w -= lr * g * min(1, clip/|g|) with
    each step's own gradient, and put no gradient on the alphas."""
    lr, clip = 0.3, 0.05
    s = _strategy({"name": "darts", "w_optim": {"lr": lr, "momentum": 0.0,
                                                 "weight_decay": 0.0, "grad_clip": clip}}, 2)
    params = list(s.supernet.parameters())
    for seed in (1, 2):
        x, y = tiny_batch(8, seed, torch.float64)
        aw = s.arch_weights()
        before = [p.detach().clone() for p in params]
        loss = F.cross_entropy(s.supernet(x, aw.detach()), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norm > clip  # the clip acts
        s.weight_step((x, y), aw)
        for p, b, g in zip(params, before, grads, strict=True):
            torch.testing.assert_close(p.detach(), b - lr * g * (clip / (norm + 1e-6)),
                                       rtol=1e-9, atol=1e-12)
        assert all(a.grad is None for a in s.alphas())


def test_the_weight_step_asks_the_objective_for_its_regularizers():
    """An objective with weight regularizers (AR/TAR) adds them on weight steps only."""
    seen = []

    class Regularized(ClassificationObjective):
        has_regularizers = True

        def __call__(self, output, batch, regularize=False):
            seen.append(regularize)
            return super().__call__(output, batch)

    s = tiny_strategy({"name": "darts"})
    s.objective = Regularized()
    s.weight_step(tiny_batch(), s.arch_weights())
    s.loss(tiny_batch(), s.arch_weights())
    assert seen == [True, False]


def test_a_penalty_is_added_to_the_loss_and_reported_under_its_name():
    s = tiny_strategy({"name": "darts"})
    s.penalties = [("cost", lambda aw, logits: aw["normal"].sum() * 0 + 2.5)]
    stats = {}
    out = s.add_penalty(torch.tensor(1.0), s.arch_weights().detach(), stats)
    assert float(out) == pytest.approx(3.5) and stats == {"penalty_cost": pytest.approx(2.5)}


def test_alpha_gradients_are_copies_of_the_given_ones():
    s = tiny_strategy({"name": "darts"})
    grads = [torch.ones_like(p) for p in s.alphas()]
    s.set_alpha_grads(grads)
    grads[0].add_(5.0)  # (a rule reusing its buffer changes no installed gradient)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in s.alphas())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_a_temperature_anneals_over_the_configured_epochs_one_step_per_epoch():
    """GDAS-style linear annealing from tau to tau_min over ``epochs`` (the strategy hands
    its epochs to the relaxation; end_epoch steps it)."""
    tau, tau_min, epochs = 2.0, 0.5, 4
    s = _strategy({"name": "darts", "relaxation": {"name": "gumbel", "tau": tau,
                                                    "tau_min": tau_min, "anneal": "linear"}},
                  epochs)
    for e in range(epochs):
        assert s.relaxation.tau == pytest.approx(tau + e / (epochs - 1) * (tau_min - tau))
        s.end_epoch()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_a_strategy_s_state_restores_its_optimizers_schedule_and_relaxation():
    section = {"name": "darts", "relaxation": {"name": "gumbel", "tau": 2.0, "tau_min": 0.5}}
    s = _strategy(section, 4)
    s.step(tiny_batch(4, 1, torch.float64), tiny_batch(4, 2, torch.float64))
    s.end_epoch()
    s.end_epoch()
    fresh = _strategy(section, 4)
    fresh.load_state_dict(s.state_dict())
    assert fresh.lr == s.lr and fresh.relaxation.tau == s.relaxation.tau
    s.end_epoch()  # the schedule goes on from where it was (not from its start)
    fresh.end_epoch()
    assert fresh.lr == pytest.approx(s.lr, rel=1e-12) and fresh.relaxation.tau == s.relaxation.tau
    for opt in ("a_optimizer", "w_optimizer"):
        a, b = getattr(s, opt).state_dict()["state"], getattr(fresh, opt).state_dict()["state"]
        assert a.keys() == b.keys() and a
        for k in a:
            for name, t in a[k].items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(b[k][name])), (opt, name)


def test_building_a_strategy_draws_nothing_from_the_run_s_generator():
    """A strategy's check_setup may build ops (random initialisation): it runs on a forked
    generator, so the search's draws do not depend on what a check built."""
    from diffnas.strategies.darts import DartsStrategy

    class Checking(DartsStrategy):
        @classmethod
        def check_setup(cls, config, arch_params, epochs):
            torch.randn(100)

    space = tiny_space()
    supernet, arch = space.build_supernet(), ArchParams(space)
    config = DartsStrategy.Config()
    torch.manual_seed(5)
    Checking(config, supernet, arch, ClassificationObjective(), 2)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_edge_normalisation_betas_are_optimised_with_the_alphas():
    s = tiny_strategy({"name": "darts", "edge_norm": True})
    optimised = {id(p) for g in s.a_optimizer.param_groups for p in g["params"]}
    assert s.arch_params.betas and all(id(b) in optimised for b in s.arch_params.betas.values())


def test_the_search_learns_from_the_labels_its_strategy_gives(monkeypatch):
    """RLNAS-style relabelling reaches both search loaders (weights and architecture)."""
    from diffnas.engine.search import build_search, load_search_data
    from diffnas.strategies.darts import DartsStrategy

    monkeypatch.setattr(DartsStrategy, "relabel", lambda self, y: torch.zeros_like(y))
    cfg = _cfg()
    data = load_search_data(cfg)
    assert bool((data.train_y != 0).any())
    task = build_search(cfg, data)
    assert not task.train.y.any() and not task.val.y.any()


# --- the loop -------------------------------------------------------------------------------
class _Steps(StatelessTask):
    """Epoch e's steps return the metrics ``rows(e)`` lists, one dict per step."""

    def __init__(self, rows, end=None):
        self.rows, self.end = rows, end or (lambda e: {})
        self.n = len(rows(0))
        self.epoch = None

    def batches(self, epoch):
        self.epoch = epoch
        return range(len(self.rows(epoch)))

    def step(self, i):
        return self.rows(self.epoch)[i]

    def end_epoch(self, epoch):
        return self.end(epoch)


def test_an_epoch_s_metrics_are_each_metric_s_mean_over_that_epoch_s_steps_alone():
    rows = {0: [{"loss": 1.0, "extra": 4.0}, {"loss": 3.0}, {"loss": 5.0}],
            1: [{"loss": 10.0}, {"loss": 20.0, "extra": 7.0}, {"loss": 30.0}]}
    history = Loop(_Steps(rows.__getitem__), 2).run()
    assert history == [{"epoch": 0, "loss": 3.0, "extra": 4.0},
                       {"epoch": 1, "loss": 20.0, "extra": 7.0}]


def test_end_of_epoch_figures_win_over_step_means_of_the_same_name():
    history = Loop(_Steps(lambda e: [{"lr": 9.0}], lambda e: {"lr": 0.5}), 1).run()
    assert history == [{"epoch": 0, "lr": 0.5}]


class _Record(Callback):
    def __init__(self):
        self.ends, self.epochs, self.value = 0, [], 0

    def on_epoch_end(self, loop, epoch, metrics):
        self.epochs.append((epoch, loop.epoch, len(loop.history)))
        self.value += 1

    def on_run_end(self, loop):
        self.ends += 1

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_stop_after_runs_that_many_epochs_and_only_a_finished_run_ends(stop_after):
    cb = _Record()
    loop = Loop(_Steps(lambda e: [{"loss": 1.0}]), 3, [cb])
    loop.run(stop_after=stop_after)
    # a callback sees the epoch counted and recorded (a checkpoint then resumes after it)
    assert cb.epochs == [(e, e + 1, e + 1) for e in range(stop_after)] and cb.ends == 0
    loop.run()
    assert loop.epoch == 3 and len(loop.history) == 3 and cb.ends == 1


def test_a_loop_state_restores_the_rng_and_the_callbacks():
    cb = _Record()
    loop = Loop(_Steps(lambda e: [{"loss": 1.0}]), 3, [cb])
    loop.run(stop_after=2)
    torch.manual_seed(9)
    random.seed(9)
    state = loop.state_dict()
    want = (torch.rand(2), random.random())
    again = _Record()
    other = Loop(_Steps(lambda e: [{"loss": 1.0}]), 3, [again])
    torch.manual_seed(0)
    random.seed(0)
    other.load_state_dict(state)
    assert torch.equal(torch.rand(2), want[0]) and random.random() == want[1]
    assert again.value == 2 and other.epoch == 2


@pytest.mark.parametrize("returned, words", [
    ({"loss": 0.5, "done": True}, "'done': bool"),
    ({"loss": torch.tensor(0.5), 3: 1.0}, "3: float"),
    ({"loss": torch.tensor(1 + 2j)}, "'loss': Tensor"),
])
def test_a_flag_a_complex_number_or_a_non_string_key_is_no_metric(returned, words):
    """A bool is an int to Python, yet no metric to average; keys name the metric."""
    task = _Steps(lambda e: [returned])
    task.strategy = SimpleNamespace(name="mine")
    with pytest.raises(TypeError, match=f"the step of strategy 'mine' .*{words}"):
        Loop(task, 1).run()


def test_a_finished_loop_over_no_batch_is_no_error():
    """Resuming a finished run computes its result again, whatever its data holds now."""
    loop = Loop(_Steps(lambda e: []), 1)
    loop.epoch = 1
    assert loop.run() == []
    with pytest.raises(ValueError, match="no full batch per epoch"):
        Loop(_Steps(lambda e: []), 1).run()


def test_an_epoch_s_seconds_count_its_end_of_epoch_work():
    loop = Loop(_Steps(lambda e: [{"loss": 1.0}], lambda e: time.sleep(0.05) or {}), 1)
    loop.run()
    assert loop.seconds >= 0.05


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_the_objective_refuses_a_non_finite_loss(value):
    out = torch.zeros(2, 3, dtype=torch.float64)
    out[0, 0] = value
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        ClassificationObjective()(out, (None, torch.tensor([0, 1])))


def test_the_objective_s_accuracy_is_the_share_of_argmax_hits():
    out = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, 2, 1])
    loss, stats = ClassificationObjective()(out, (None, y))
    assert stats["acc"] == pytest.approx(0.5)
    assert stats["loss"] == pytest.approx(-torch.log_softmax(out, -1)[range(4), y].mean().item())


# --- the search task ------------------------------------------------------------------------
def _loaders(split=0.5, n=60, bs=10, single=False):
    cfg = _cfg(f"data.batch_size={bs}", f"data.search_split={split}")
    x, y = torch.arange(n).float().view(n, 1), torch.arange(n)
    return search_loaders(cfg, x, y, uses_validation=not single)


def test_each_epoch_shuffles_the_training_batches_by_its_own_index():
    train, val = _loaders()
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    orders = []
    for epoch in (0, 1, 2):
        got = torch.cat([t[1] for t, _ in task.batches(epoch)])
        twin, _ = _loaders()
        twin.set_epoch(epoch)
        assert torch.equal(got, torch.cat([b[1] for b in twin]))
        orders.append(got)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_a_further_validation_pass_is_ordered_by_its_own_epoch_index():
    """Pass k of epoch e is the loader's order at e + k * VAL_PASS_STRIDE."""
    from diffnas.engine.search import VAL_PASS_STRIDE

    train, val = _loaders(split=0.8, n=100)  # 8 weight batches, 2 validation ones
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    got = torch.cat([v[1] for _, v in task.batches(3)])
    want = []
    for k in range(4):
        val.set_epoch(3 + k * VAL_PASS_STRIDE)
        want += [b[1] for b in val]
    assert torch.equal(got, torch.cat(want))


def test_the_search_loaders_split_drop_the_last_batch_and_shuffle_apart():
    train, val = _loaders(split=0.5, n=65, bs=10)
    assert len(train.x) + len(val.x) == 65 and len(train) == len(train.x) // 10
    assert sum(len(b[1]) for b in val) == 10 * (len(val.x) // 10)  # partial batch dropped
    # equal sizes: one shared seed would give both the same permutation of positions
    t, v = _loaders(split=0.5, n=60)
    pos_t = [int((t.y == i).nonzero()) for i in torch.cat([b[1] for b in t])]
    pos_v = [int((v.y == i).nonzero()) for i in torch.cat([b[1] for b in v])]
    assert pos_t != pos_v
    single, none = _loaders(n=65, single=True)
    assert none is None and len(single.x) == 65 and len(single) == 6


def test_a_validation_part_without_a_full_batch_gives_no_search_step():
    """80/20 of 30 images in batches of 10: two weight batches, no architecture batch, so
    no step can run (rather than a loop waiting forever on an empty validation loader)."""
    from diffnas.engine.search import check_full_batch

    train, val = _loaders(split=0.8, n=30, bs=10)
    assert len(train) == 2 and len(val) == 0
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    assert task.num_batches() == 0
    with pytest.raises(ValueError, match=r"no full batch per epoch.*\(data\.batch_size\)"):
        Loop(task, 1).run()
    with pytest.raises(ConfigError, match="leaves 24 images to train the weights and 6 the"):
        check_full_batch(_cfg("data.batch_size=10", "data.search_split=0.8"), 30)
    single, _ = _loaders(split=0.8, n=30, bs=10, single=True)
    assert SearchTask(SimpleNamespace(step=None), None, single, None).num_batches() == 3


class _Stub:
    """A strategy whose loss of a batch of values is their mean (acc: share above 0),
    recording the supernet's mode at each call."""

    def __init__(self):
        self.supernet, self.modes = nn.Linear(1, 1), []

    def loss(self, batch, arch_weights):
        self.modes.append(self.supernet.training)
        v = batch[0]
        return None, {"loss": v.mean().item(), "acc": (v > 0).float().mean().item()}


def test_the_end_of_epoch_evaluation_weighs_batches_by_size_in_eval_mode_then_trains():
    x = torch.tensor([1.0, -2.0, 4.0, 8.0, -3.0, 6.0, 5.0])
    batches = [(x[:3], x[:3]), (x[3:6], x[3:6]), (x[6:], x[6:])]  # 3, 3 and 1 images
    s = _Stub()
    out = evaluate_supernet(s, batches, None)
    assert out["loss"] == pytest.approx(x.mean().item())
    assert out["acc"] == pytest.approx((x > 0).float().mean().item())
    assert s.modes == [False] * 3 and s.supernet.training


GUMBEL = {"name": "gumbel", "tau": 2.0, "tau_min": 0.5, "anneal": "linear"}


@pytest.fixture
def gumbel_taus(monkeypatch) -> list[float]:
    """The temperature of every Gumbel draw from here on, in order."""
    from diffnas.arch.relax import RELAXATIONS

    gumbel, seen = RELAXATIONS.get("gumbel"), []
    call = gumbel.__call__
    monkeypatch.setattr(gumbel, "__call__", lambda self, logits: (
        seen.append(self.tau), call(self, logits))[1])
    return seen


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("section", [
    {"name": "darts"}, {"name": "few_shot", "split_epoch": 1}], ids=["darts", "few_shot"])
def test_an_epoch_is_evaluated_at_the_temperature_it_trained_at(section, gumbel_taus):
    """SNAS's soft Gumbel draws depend on tau: an epoch's end-of-epoch figures use the
    temperature its steps used, not the next epoch's (the schedule steps first); after a
    few-shot split the exported alphas are measured at the sub-supernets' temperature."""
    epochs = 4
    section = {**section, "relaxation": GUMBEL}
    s = _strategy(section, epochs, dtype=torch.float32)
    task = SearchTask(s, tiny_space(), None, None, eval_val=[tiny_batch(4, 3)])
    for epoch in range(epochs):
        gumbel_taus.clear()
        s.step(tiny_batch(4, 1), tiny_batch(4, 2))
        tau = 2.0 + epoch / (epochs - 1) * (0.5 - 2.0)
        assert gumbel_taus and all(t == pytest.approx(tau) for t in gumbel_taus)
        gumbel_taus.clear()
        task.end_epoch(epoch)
        assert gumbel_taus[-1] == pytest.approx(tau), epoch  # (few-shot scores its subs first)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("engine", ["graph", "lm"])
def test_graph_and_lm_epochs_are_evaluated_at_their_own_temperature(engine, tmp_path,
                                                                     gumbel_taus):
    section = f"search.strategy={{name: darts, relaxation: {json.dumps(GUMBEL)}}}"
    if engine == "graph":
        task = _graph_task(tmp_path, section, "search.epochs=3")
    else:
        from test_rnn_lm import _tiny_lm_config

        from diffnas.config import load_config
        from diffnas.data.text import load_corpus
        from diffnas.engine.lm import build_lm_search

        cfg = load_config(str(_tiny_lm_config(tmp_path)), [
            section, "search.space.nodes=2", "search.epochs=3"])
        task = build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))
        task.step(next(iter(task.batches(0))))
    gumbel_taus.clear()
    task.end_epoch(0)
    assert gumbel_taus == [pytest.approx(2.0)]  # epoch 0's, with the schedule at epoch 1's:
    assert task.strategy.relaxation.tau == pytest.approx(1.25)


def test_the_genotype_ranks_edges_by_their_edge_normalisation_weight():
    """With edge_norm the darts rule ranks node 3's three inputs by edge weight times the
    strongest op's weight: a strong edge weight promotes a weaker op."""
    s = tiny_strategy({"name": "darts", "edge_norm": True})
    arch = s.arch_params
    edges = arch.edges["normal"]
    into3 = [i for i, e in enumerate(edges) if e.dst == 3]
    assert len(into3) == 3
    ops = arch.candidates("normal")
    live = [j for j, o in enumerate(ops) if o != "none"][0]
    with torch.no_grad():
        for g in arch.groups():
            arch[g].zero_()
        for strength, i in zip((3.0, 2.0, 1.0), into3):  # op strength: first edge strongest
            arch["normal"][i, live] = strength
        arch.betas["normal"][into3[2]] = 4.0  # the weakest op's edge gets most weight
    w = torch.softmax(arch["normal"].detach().double(), -1)
    beta = torch.softmax(arch.betas["normal"][into3].detach().double(), 0)
    strength = {edges[i].src: float(beta[k] * w[i, live]) for k, i in enumerate(into3)}
    want = sorted(strength, key=lambda src: -strength[src])[:2]
    assert want != [edges[i].src for i in into3[:2]]  # the weights change the choice
    task = SearchTask(s, tiny_space(), None, None)
    cell = next(c for c in task.genotype().cells if c.name == "normal")
    assert [e.src for e in cell.edges if e.dst == 3] == want


def test_a_finished_search_is_not_run_again_and_retraining_follows_its_switch(tmp_path):
    calls = []
    g = tiny_strategy({"name": "darts"})
    from diffnas.genotype.discretize import discretize

    genotype = discretize(g.arch_params.as_dict(), tiny_space())
    for enabled in (True, False):
        cfg = _cfg(f"retrain.enabled={str(enabled).lower()}")
        search_then_retrain(cfg, tmp_path, lambda: calls.append("search") or genotype,
                            lambda gt: calls.append("retrain") or {},
                            lambda gt, r: calls.append(("report", r)))
    assert calls == ["search", "retrain", ("report", {}), "search", ("report", None)]
    calls.clear()
    (tmp_path / "search").mkdir()
    (tmp_path / "search/genotype.json").write_text(genotype.to_json())
    (tmp_path / "search/DONE").touch()
    search_then_retrain(_cfg("retrain.enabled=false"), tmp_path,
                        lambda: calls.append("search") or genotype, lambda gt: {},
                        lambda gt, r: calls.append(gt == genotype))
    assert calls == [True]


# --- ArchParams: edge normalisation -------------------------------------------------------
def test_edge_weights_are_a_softmax_over_each_node_s_incoming_edges():
    arch = ArchParams(tiny_space())
    arch.add_edge_betas()
    with torch.no_grad():
        for b in arch.betas.values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)))
    for group, w in arch.edge_weights().items():
        edges = arch.edges[group]
        for node in {e.dst for e in edges}:
            idx = [i for i, e in enumerate(edges) if e.dst == node]
            torch.testing.assert_close(w[idx], torch.softmax(arch.betas[group][idx], 0))


def test_adding_edge_betas_twice_keeps_the_first_ones():
    arch = ArchParams(tiny_space())
    arch.add_edge_betas()
    first = arch.betas["normal"]
    with torch.no_grad():
        first.fill_(0.7)
    arch.add_edge_betas()
    assert arch.betas["normal"] is first and bool((first == 0.7).all())


def test_normalising_scales_op_weights_by_edge_weight_and_keeps_the_sampled_ops():
    arch = ArchParams(tiny_space())
    arch.add_edge_betas()
    w = {g: torch.ones_like(a) for g, a in arch.as_dict().items()}
    active = {g: torch.zeros(a.shape[0], dtype=torch.long) for g, a in arch.as_dict().items()}
    out = arch.normalize(ArchWeights(w, active))
    assert out.active is active
    for g, e in arch.edge_weights().items():
        torch.testing.assert_close(out[g], e.unsqueeze(-1).expand_as(w[g]))


def test_edges_of_one_group_with_different_candidate_lists_are_refused():
    space = SimpleNamespace(edge_groups=lambda: {"cell": [
        EdgeSpec("cell/n2/e0", "cell", 0, 2, ("a", "b")),
        EdgeSpec("cell/n2/e1", "cell", 1, 2, ("a",))]})
    with pytest.raises(ValueError, match="'cell' must share one candidate list"):
        ArchParams(space)


# --- image retraining checks ----------------------------------------------------------------
def test_a_retrain_batch_as_large_as_the_subset_is_one_full_batch():
    from diffnas.engine.image import check_image_retrain

    check_image_retrain(_cfg("retrain.batch_size=16", "retrain.train_subset=16"))
    with pytest.raises(ConfigError, match="exceeds retrain.train_subset=16"):
        check_image_retrain(_cfg("retrain.batch_size=17", "retrain.train_subset=16"))


# --- the graph engine -----------------------------------------------------------------------
def _graph_task(tmp_path, *overrides):
    from test_graph_space import tiny_cfg

    from diffnas.data.graph import load_graph
    from diffnas.engine.graph import build_graph_search

    return build_graph_search(tiny_cfg(tmp_path, *overrides), load_graph("karate"))


def test_graph_dropout_seeds_differ_per_epoch_and_stream(tmp_path):
    """Each (epoch, stream) draws its own dropout masks: the search's train and val
    passes, and the retraining's, never share a seed over the first epochs."""
    from test_graph_space import tiny_cfg

    from diffnas.engine.graph import GraphTrainTask

    task = _graph_task(tmp_path)
    seeds = []
    for epoch in range(4):
        train, val = next(iter(task.batches(epoch)))
        seeds += [train.seed, val.seed]
    retrain = GraphTrainTask(nn.Linear(1, 1), task.splits, tiny_cfg(tmp_path))
    seeds += [retrain.train_batch(epoch).seed for epoch in range(4)]
    assert len(set(seeds)) == len(seeds) == 12


def test_a_single_level_graph_search_gets_no_validation_batch(tmp_path):
    task = _graph_task(tmp_path, "search.strategy={name: single_level}")
    assert [b[1] for b in task.batches(0)] == [None]
    task = _graph_task(tmp_path, "search.strategy={name: darts}")
    assert next(iter(task.batches(0)))[1].idx is task.splits.data.val_idx


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_a_graph_epoch_logs_the_lr_its_step_used(tmp_path):
    task = _graph_task(tmp_path, "search.epochs=4")
    for e in range(3):
        lr = task.strategy.lr
        assert task.end_epoch(e)["lr"] == lr and task.strategy.lr < lr


def test_a_relabelling_strategy_relabels_the_training_nodes_alone(tmp_path, monkeypatch):
    """RLNAS-style random labels reach the weight step's nodes; validation (and every
    other node) keeps the true labels."""
    from diffnas.strategies.darts import DartsStrategy

    monkeypatch.setattr(DartsStrategy, "relabel", lambda self, y: (y + 1) % 2)
    task = _graph_task(tmp_path)
    d = task.splits.data
    train, val = next(iter(task.batches(0)))
    assert torch.equal(train.y[d.train_idx], (d.y[d.train_idx] + 1) % 2)
    others = torch.ones(d.num_nodes, dtype=torch.bool)
    others[d.train_idx] = False
    assert torch.equal(train.y[others], d.y[others]) and torch.equal(val.y, d.y)


def test_graph_evaluation_runs_in_eval_mode_and_restores_the_mode(tmp_path):
    from diffnas.engine.graph import evaluate_nodes

    task = _graph_task(tmp_path)
    batch = task.splits.batch("val")

    class ModeLogits(nn.Module):
        """Logits of the true labels in eval mode, of wrong ones in training mode."""

        def forward(self, inp):
            n = int(batch.y.max()) + 1
            y = batch.y if not self.training else (batch.y + 1) % n
            return F.one_hot(y, n).float()

    for training in (True, False):
        m = ModeLogits().train(training)
        assert evaluate_nodes(m, batch)["acc"] == 1.0
        assert m.training is training
