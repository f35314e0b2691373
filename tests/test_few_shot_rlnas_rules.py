"""Rules of few-shot NAS and RLNAS that a mutation audit could break unseen (a second pass
after test_strategy_rules.py, test_family_few_shot.py and test_family_random_labels.py).

Few-shot: a sub-supernet steps as a DARTS first-order search with the run's weight and
alpha optimizer settings, at the learning rate of the run's cosine schedule; the one-shot
phase reports its validation figures under ``val_``; the winner of an epoch without
held validation batches is the lowest *mean* loss (a sub-supernet without a turn never
wins; ties go to the lowest index); the export of a split over two edges makes both
fixed ops dominant, and every sub-supernet starts from the parent's alphas at the split;
a run cut at an epoch's end whose round robin is mid-cycle resumes bit for bit.

RLNAS: the angle metric replayed in float64 on explicit weight vectors (the shared
weights, the path's ops, the pooling ops' fixed kernels); a zero-norm side gives angle 0;
the default ``exclude_ops`` fits a space without ``none``; mutated paths stay among the
allowed ops; the evolution breeds ``population`` children from the ``parents`` best paths,
by mutation and crossover; a validation batch is refused; the weight schedule steps at an
epoch's end; and a run cut in the middle of an epoch resumes bit for bit."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy
from test_family_smoke import nb201_space

from diffnas.arch import ArchParams
from diffnas.arch.relax import create_relaxation
from diffnas.strategies import ClassificationObjective, create_strategy
from diffnas.strategies.few_shot import FixedOpRelaxation
from diffnas.strategies.random_labels import angle_from_sums

F64 = torch.float64
RL = {"name": "random_labels", "population": 4, "iterations": 1, "parents": 2,
      "w_optim": {"weight_decay": 0.0, "momentum": 0.0}}
W_OPTIM = {"lr": 0.05, "lr_min": 0.002, "momentum": 0.5, "weight_decay": 1e-3}
A_OPTIM = {"lr": 0.01, "betas": [0.6, 0.95], "weight_decay": 0.0}


def _few_shot(section: dict, epochs: int = 2, space=None, dtype=F64):
    torch.manual_seed(0)
    space = space or tiny_space()
    s = create_strategy({"name": "few_shot", "split_epoch": 1, **section},
                        space.build_supernet().to(dtype), ArchParams(space).to(dtype),
                        ClassificationObjective(), epochs=epochs)
    return s


def _batches(i: int, dtype=F64):
    return tiny_batch(4, 2 * i, dtype), tiny_batch(4, 2 * i + 1, dtype)


def _split(s) -> None:
    s.step(*_batches(0, s.alphas()[0].dtype))
    s.end_epoch()
    assert s.subnets


def _cosine(w: dict, epoch: int, epochs: int) -> float:
    return w["lr_min"] + (w["lr"] - w["lr_min"]) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# --- few shot ------------------------------------------------------------------------------
def test_a_sub_supernet_steps_as_darts_first_order_with_the_run_s_optimizers():
    """Replayed by hand: a DARTS order-1 twin built from the parent at the split (its own
    optimizers from the run's settings, the lr of the cosine schedule after one of two
    epochs, the split edge fixed) takes the same step as sub-supernet 0, bit for bit."""
    section = {"split_edges": ["normal/n3/e1"], "w_optim": W_OPTIM, "a_optim": A_OPTIM}
    s = _few_shot(section)
    _split(s)
    for sub in s.subnets:
        assert sub.config.order == 1
        (wg,), (ag,) = sub.w_optimizer.param_groups, sub.a_optimizer.param_groups
        assert (wg["momentum"], wg["weight_decay"]) == (0.5, 1e-3)
        assert (ag["lr"], tuple(ag["betas"]), ag["weight_decay"]) == (0.01, (0.6, 0.95), 0.0)
        assert wg["lr"] == pytest.approx(_cosine(W_OPTIM, 1, 2), rel=1e-12)
    twin = create_strategy({"name": "darts", "order": 1, "w_optim": W_OPTIM, "a_optim": A_OPTIM},
                           copy.deepcopy(s.supernet), copy.deepcopy(s.arch_params),
                           ClassificationObjective(), epochs=2)
    (g, row), = s.split_rows
    twin.relaxation = FixedOpRelaxation(create_relaxation("softmax"), {g: {row: 0}})
    for group in twin.w_optimizer.param_groups:
        group["lr"] = _cosine(W_OPTIM, 1, 2)
    train, val = _batches(1)
    assert s.step(train, val) == twin.step(train, val)  # sub-supernet 0's turn
    for a, b in zip(s.subnets[0].alphas(), twin.alphas(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(s.subnets[0].supernet.parameters(), twin.supernet.parameters(),
                    strict=True):
        assert torch.equal(a, b)


def test_the_one_shot_phase_reports_validation_figures_under_val():
    """The step's stats are the weight step's (``loss``) and the alpha step's under
    ``val_``, as a DARTS first-order step's; ``val_loss`` is the validation batch's loss
    before the step."""
    s = _few_shot({"split_edges": ["normal/n3/e1"]})
    ref = create_strategy({"name": "darts", "order": 1}, copy.deepcopy(s.supernet),
                          copy.deepcopy(s.arch_params), ClassificationObjective(), epochs=2)
    probe = copy.deepcopy(s)
    with torch.no_grad():
        want_val = float(probe.loss(_batches(0)[1], probe.arch_weights())[0])
    stats = s.step(*_batches(0))
    assert stats == ref.step(*_batches(0))
    assert stats["val_loss"] == pytest.approx(want_val, rel=1e-12)
    assert stats["loss"] != stats["val_loss"]  # two batches: the train loss is its own


@pytest.fixture(scope="module")
def split_run():
    """A few-shot run just split on normal/n3/e1 (eight sub-supernets), no batch held."""
    s = _few_shot({"split_edges": ["normal/n3/e1"]}, dtype=torch.float32)
    _split(s)
    assert not s.held and len(s.subnets) == 8
    return s


def test_without_held_batches_the_lowest_mean_loss_wins_and_a_sub_without_a_turn_never(
        split_run):
    """Scores from the turns' own losses: the mean (not the sum: more turns would lose),
    and inf for a sub-supernet with no turn."""
    s = split_run
    s.val_loss = [[3.0, 1.0], [2.5], []] + [[9.0]] * 5
    assert s.scores() == [2.0, 2.5, math.inf] + [9.0] * 5
    assert s.best() == 0


@pytest.mark.parametrize("losses, best", [
    ([1.0, 1.0, 1.0], 0),
    ([2.0, 1.0, 1.0], 1),
    ([2.0, 3.0, 0.5, 0.5], 2),
])
def test_a_tie_goes_to_the_lowest_index(split_run, losses, best):
    s = split_run
    s.val_loss = [[v] for v in losses] + [[5.0]] * (8 - len(losses))
    assert s.best() == best


def test_a_split_on_two_edges_fixes_both_and_the_export_makes_both_dominant():
    """nb201: two split edges of five ops each make 25 sub-supernets, one per pair of ops,
    each starting from the parent's alphas and weights at the split; the export raises
    both fixed ops 10 above their row and keeps the sub-supernet's other logits."""
    labels = ["cell/n2/e1", "cell/n3/e2"]
    s = _few_shot({"split_edges": labels}, space=nb201_space(), dtype=torch.float32)
    s.step(*_batches(0, torch.float32))
    parent_alphas = [a.detach().clone() for a in s.alphas()]
    parent_weights = copy.deepcopy(s.supernet.state_dict())
    s.end_epoch()
    rows = [next(r for r, e in enumerate(s.arch_params.edges["cell"]) if e.label == lb)
            for lb in labels]
    n_ops = len(s.arch_params.candidates("cell"))
    assert len(s.subnets) == n_ops ** 2
    pairs = {tuple(f["cell"][r] for r in rows) for f in s.fixed}
    assert pairs == {(a, b) for a in range(n_ops) for b in range(n_ops)}
    for sub, fixed in zip(s.subnets, s.fixed, strict=True):
        for a, b in zip(sub.alphas(), parent_alphas, strict=True):
            assert torch.equal(a, b)
        for k, v in sub.supernet.state_dict().items():
            assert torch.equal(v, parent_weights[k])
        w = sub.arch_weights()["cell"]
        for r in rows:
            assert torch.equal(w[r], torch.nn.functional.one_hot(
                torch.tensor(fixed["cell"][r]), n_ops).to(w))
    i = next(i for i, f in enumerate(s.fixed) if [f["cell"][r] for r in rows] == [3, 1])
    with torch.no_grad():
        s.subnets[i].arch_params["cell"][rows[0]] = torch.tensor([0.0, 2.0, 1.0, -1.0, 0.5])
        s.subnets[i].arch_params["cell"][rows[1]] = torch.tensor([1.0, -3.0, 0.0, 0.2, 0.1])
    s.export(i)
    got = s.arch_params["cell"].detach()
    assert torch.equal(got[rows[0]], torch.tensor([0.0, 2.0, 1.0, 12.0, 0.5]))
    assert torch.equal(got[rows[1]], torch.tensor([1.0, 11.0, 0.0, 0.2, 0.1]))


def _run_epoch(s, epoch: int, steps: int = 2) -> None:
    for k in range(steps):
        s.step(*_batches(10 * epoch + k, torch.float32))
    s.end_epoch()


def test_a_few_shot_run_cut_mid_round_robin_resumes_bit_for_bit():
    """Two steps an epoch for three sub-supernets: the round robin is mid-cycle at an
    epoch's end. Cut there and resumed into a fresh strategy (another init, Gumbel
    noise), the run ends as the uninterrupted one: alphas, weights, every sub-supernet."""
    section = {"split_edges": ["normal/n3/e1"], "relaxation": {"name": "gumbel", "tau": 1.0}}
    ops = ["skip_connect", "sep_conv_3x3", "max_pool_3x3"]
    a = _few_shot(section, epochs=3, space=tiny_space(ops=ops), dtype=torch.float32)
    for epoch in range(2):
        _run_epoch(a, epoch)
    assert len(a.subnets) == 3 and a.turn == 2
    state = copy.deepcopy(a.state_dict())
    rng = torch.get_rng_state()
    _run_epoch(a, 2)
    torch.manual_seed(1)
    space = tiny_space(ops=ops)
    b = create_strategy({"name": "few_shot", "split_epoch": 1, **section},
                        space.build_supernet(), ArchParams(space), ClassificationObjective(),
                        epochs=3)
    b.load_state_dict(state)
    torch.set_rng_state(rng)
    _run_epoch(b, 2)
    assert a.turn == b.turn == 4
    for x, y in ((a, b), *zip(a.subnets, b.subnets, strict=True)):
        for p, q in zip(x.alphas(), y.alphas(), strict=True):
            assert torch.equal(p, q)
        sx, sy = x.supernet.state_dict(), y.supernet.state_dict()
        for name in sx:
            assert torch.equal(sx[name], sy[name]), name


# --- random labels: the angle -------------------------------------------------------------
@pytest.mark.parametrize("sums", [(0.0, 0.0, 4.0), (0.0, 4.0, 0.0), (0.0, 0.0, 0.0)])
def test_the_angle_with_a_zero_vector_is_zero(sums):
    """A block whose initial (or current) weights are all zero has no direction: angle 0,
    not a division by zero."""
    assert angle_from_sums(*sums) == 0.0


_OP_PARAM = re.compile(r"^cells\.(\d+)\.edges\.(\d+)\.ops\.(\d+)\.")


def test_the_angle_is_replayed_on_explicit_float64_vectors():
    """nb201: the vector of a path is the shared weights, the weights of each op on the
    path (in every cell, by parameter name) and, for avg_pool_3x3, a fixed C x 3 x 3
    kernel of 1/9 per cell (C = 4, 8, 16); the angle is acos of the cosine between the
    initial and the current vectors, built and compared here in float64."""
    s = tiny_strategy(RL, space=nb201_space(), dtype=F64)
    s.map_edges(tiny_batch(2, 0, F64)[0])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # moved by hand, each parameter by its own amount
        for p in s.supernet.parameters():
            p.mul_(0.7).add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    names = s.arch_params.candidates("cell")
    pool = names.index("avg_pool_3x3")
    cur = dict(s.supernet.named_parameters())

    def vectors(path, include_shared):
        w0, w = [], []
        for n, p in cur.items():
            m = _OP_PARAM.match(n)
            on_path = m is not None and int(path[int(m.group(2))]) == int(m.group(3))
            if on_path or (m is None and include_shared):
                w0.append(s.init_weights[n].flatten())
                w.append(p.detach().flatten())
        for op in path.tolist():
            if op == pool:
                for c in (4, 8, 16):
                    k = torch.full((c * 9,), 1 / 9, dtype=F64)
                    w0.append(k)
                    w.append(k)
        empty = [torch.zeros(0, dtype=F64)]
        return torch.cat(w0 or empty), torch.cat(w or empty)

    for ops in ([3, 2, 4, 1, 3, 4], [4, 4, 4, 4, 4, 4], [2, 3, 1, 1, 2, 3], [1] * 6):
        path = torch.tensor(ops)
        for include_shared in (True, False):
            a, b = vectors(path, include_shared)
            if a.numel() == 0:
                want = 0.0
            else:
                want = math.acos(min(1.0, float(a @ b / (a.norm() * b.norm()))))
            got = s.angle({"cell": path}, include_shared=include_shared)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-7), (ops, include_shared)


# --- random labels: exclusion, evolution, the step ------------------------------------------
def test_the_default_exclusion_of_none_fits_a_space_without_none():
    """``exclude_ops: [none]`` is the default; in a space whose ops lack 'none' it
    excludes nothing and is no error."""
    space = tiny_space(ops=["skip_connect", "sep_conv_3x3", "avg_pool_3x3"])
    s = tiny_strategy({**RL, "w_optim": {}}, space=space)
    for g in s.arch_params.groups():
        assert s.allowed[g].tolist() == [0, 1, 2]


def test_mutated_paths_stay_among_the_allowed_ops():
    s = tiny_strategy({**RL, "mutate_prob": 1.0, "exclude_ops": ["none", "nor_conv_3x3"]},
                      space=nb201_space())
    names = s.arch_params.candidates("cell")
    allowed = {names.index(o) for o in ("skip_connect", "nor_conv_1x1", "avg_pool_3x3")}
    torch.manual_seed(0)
    seen = set()
    for _ in range(100):
        seen |= set(s._mutate(s.sample_path())["cell"].tolist())
    assert seen == allowed


def test_zero_parents_is_refused():
    with pytest.raises(ValueError, match=r"1 <= parents <= population, got 4, 0"):
        tiny_strategy({**RL, "parents": 0})


def test_the_evolution_breeds_population_children_from_the_parents_best(monkeypatch):
    """One iteration: ``population`` children, each a mutation or a crossover of paths
    among the ``parents`` fittest of the first population (a made-up fitness with no
    ties), both kinds used."""
    s = tiny_strategy({**RL, "population": 8, "iterations": 1, "parents": 3},
                      space=nb201_space())
    weights = torch.tensor([5.0 ** i for i in range(6)])

    def fitness(p, include_shared=True, sums=None):
        return float((p["cell"].double() * weights).sum())

    monkeypatch.setattr(s, "_sums", lambda: {})
    monkeypatch.setattr(s, "angle", fitness)
    first, used, kinds = [], [], []
    sample, mutate, cross = s.sample_path, s._mutate, s._cross
    monkeypatch.setattr(s, "sample_path", lambda: first.append(sample()) or first[-1])
    monkeypatch.setattr(s, "_mutate", lambda p: (used.append(p), kinds.append("m"),
                                                  mutate(p))[2])
    monkeypatch.setattr(s, "_cross", lambda a, b: (used.extend([a, b]), kinds.append("c"),
                                                    cross(a, b))[2])
    torch.manual_seed(0)
    s.evolve()
    assert len(kinds) == 8 and set(kinds) == {"m", "c"}
    distinct = {tuple(p["cell"].tolist()): fitness(p) for p in first}
    top = sorted(distinct, key=lambda k: -distinct[k])[:3]
    assert {tuple(p["cell"].tolist()) for p in used} == set(top)


def test_random_labels_refuses_a_validation_batch_and_moves_nothing():
    s = tiny_strategy(RL, space=nb201_space())
    weights = copy.deepcopy(s.supernet.state_dict())
    with pytest.raises(ValueError, match="random_labels trains on one stream; it got a "
                                         "validation batch"):
        s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    for n, w in s.supernet.state_dict().items():
        assert torch.equal(w, weights[n]), n


def test_random_labels_steps_the_weight_schedule_at_an_epoch_s_end():
    s = tiny_strategy(RL, space=nb201_space())
    w = {"lr": s.config.w_optim.lr, "lr_min": s.config.w_optim.lr_min}
    s.step(tiny_batch(4, 1), None)
    s.end_epoch()
    assert s.w_optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(w, 1, 2), rel=1e-12)


def test_a_random_labels_run_cut_mid_epoch_resumes_bit_for_bit():
    """Cut after two of three steps of the second epoch, loaded into a fresh strategy
    (another init) and continued with the same RNG: the sample counts, the weights, the
    best path, its angle and the exported logits equal the uninterrupted run's."""

    def steps(s, ks):
        for k in ks:
            s.step(tiny_batch(4, k), None)

    torch.manual_seed(7)
    a = tiny_strategy(RL, space=nb201_space())
    steps(a, range(3))
    a.end_epoch()
    steps(a, range(3, 5))
    state = copy.deepcopy(a.state_dict())
    rng = torch.get_rng_state()
    steps(a, [5])
    a.end_epoch()
    b = tiny_strategy(RL, space=nb201_space(), seed=1)
    b.load_state_dict(state)
    torch.set_rng_state(rng)
    steps(b, [5])
    b.end_epoch()
    assert a.best_angle == b.best_angle > 0
    assert torch.equal(a.best_path["cell"], b.best_path["cell"])
    assert torch.equal(a.counts["cell"], b.counts["cell"])
    assert int(a.counts["cell"].sum()) == 6 * 6
    for p, q in zip(a.alphas(), b.alphas(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.supernet.state_dict(), b.supernet.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
