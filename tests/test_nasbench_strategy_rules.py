"""Rules of the NAS-Bench-201 query strategies that a second mutation audit broke without a
test failing: REINFORCE without a random start, its give-up count, its settings and the
cell it reports with a latency predictor; NAO's encoder and attention decoder replayed by
hand (LSTM gates written out, float64), its round loss, how a round retries the cells still
pending with the next larger step and falls back to random cells; the predictor round's
stop on a loss of None; the GCN and comparator round losses replayed by hand (label 1 when
a beats b, tied pairs left out); the random part of the candidate pool; CTNAS ending when a
round queries nothing; the settings every strategy refuses or accepts at its boundaries.
Each test checks one rule on a made-up lookup, against an independent computation.
(test_nb201_rules.py, test_query_strategy_rules.py, test_nao_attention.py and
test_ctnas.py hold the rules covered before.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_nb201_rules import SpyRng, _nao, learnable, started
from torch import nn

import diffnas.nasbench.strategies.ctnas as ctnas
from diffnas.nasbench import QueryOracle, create_query_strategy
from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, all_cells_array
from diffnas.nasbench.graph import graph_tensors
from diffnas.nasbench.strategies.base import (
    candidate_pool,
    query_random,
    seeded_model,
    unseen_mask,
)
from diffnas.nasbench.strategies.nao import Nao
from diffnas.nasbench.strategies.predictor import PredictorConfig, PredictorSearch


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def onehot(cell) -> np.ndarray:
    out = np.zeros((NUM_EDGES, NUM_OPS))
    out[np.arange(NUM_EDGES), list(cell)] = 1.0
    return out


def model_of(name: str, seed: int = 0, **settings):
    """A strategy and its model, the weights seeded without touching torch's global RNG."""
    s = create_query_strategy(name, settings)
    return s, seeded_model(torch.Generator().manual_seed(seed), s.build_model)


# --- REINFORCE ---------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.0, 0.6])
def test_reinforce_without_a_start_takes_its_first_reward_as_the_baseline(decay):
    """``initial`` 0: the first episode has nothing to be compared with, so it leaves the
    policy as it is (advantage 0) and its reward *is* the baseline (not an average decayed
    from 0); then advantage ``r - b`` and ``b <- decay b + (1 - decay) r``. Every policy
    sampled from equals this float64 replay."""
    lr = 4.0
    oracle, rng = QueryOracle(learnable, budget=12), SpyRng(1)
    create_query_strategy("reinforce", {"lr": lr, "baseline_decay": decay,
                                        "initial": 0}).search(oracle, rng)
    steps = len(rng.draws) // NUM_EDGES
    assert steps >= 12 and oracle.used == 12
    logits, b = np.zeros((NUM_EDGES, NUM_OPS)), None
    for t in range(steps):
        p = softmax_rows(logits)
        got = np.array(rng.policies[t * NUM_EDGES:(t + 1) * NUM_EDGES])
        np.testing.assert_allclose(got, p, rtol=1e-10, atol=1e-13, err_msg=f"step {t}")
        cell = tuple(rng.draws[t * NUM_EDGES:(t + 1) * NUM_EDGES])
        r = learnable(cell) / 100.0
        advantage = 0.0 if b is None else r - b
        b = r if b is None else decay * b + (1 - decay) * r
        logits = logits + lr * advantage * (onehot(cell) - p)
    assert oracle.history[0][0] == tuple(rng.draws[:NUM_EDGES])  # no random start


class OneCellRng(SpyRng):
    """Every policy sample is op 0 on every edge: one cell, free after its first query."""

    def choice(self, n, p):
        self.policies.append(np.array(p, dtype=np.float64))
        self.draws.append(0)
        return 0


@pytest.mark.parametrize("factor, budget, initial", [(1, 6, 0), (2, 5, 3), (3, 4, 2)])
def test_reinforce_gives_up_after_max_steps_factor_times_the_budget(factor, budget, initial):
    """Episodes that sample a known cell cost nothing: the search stops after
    ``max_steps_factor * budget`` episodes, the ``initial`` random cells counting as
    episodes, with the budget unspent."""
    rng = OneCellRng(0)
    oracle = QueryOracle(learnable, budget)
    create_query_strategy("reinforce", {"max_steps_factor": factor, "initial": initial,
                                        "baseline_decay": 0.5}).search(oracle, rng)
    assert len(rng.draws) == (factor * budget - initial) * NUM_EDGES
    start = [c for c, _ in oracle.history[:initial]]
    assert (0,) * NUM_EDGES not in start
    assert oracle.used == initial + 1


def test_latency_aware_reinforce_reports_the_first_best_reward_and_loads_once(monkeypatch):
    """With a latency predictor the reported cell is the queried one of the highest
    MnasNet reward ``acc/100 * (latency/target) ** w``, the first queried on ties (not the
    most accurate); the predictor is loaded once, however many rewards are asked."""
    import diffnas.hardware.penalty as penalty

    latency = {(3,) * 6: 40.0, (1,) * 6: 20.0, (2,) * 6: 10.0, (4,) * 6: 5.0}
    answers = {(3,) * 6: 90.0, (1,) * 6: 80.0, (2,) * 6: 80.0, (4,) * 6: 50.0}
    loads = []
    monkeypatch.setattr(penalty, "cell_latency_fn",
                        lambda path: loads.append(path) or (lambda cell: latency[tuple(cell)]))
    s = create_query_strategy("reinforce", {"latency_predictor": "lat.pt",
                                            "latency_target_ms": 20.0,
                                            "latency_w": (0.0, -1.0)})
    oracle = QueryOracle(answers.__getitem__, budget=4)
    for cell in answers:
        oracle.query(cell)

    def by_hand(cell, acc):
        lat = latency[cell]
        return acc / 100 * (lat / 20.0) ** (0.0 if lat <= 20.0 else -1.0)

    rewards = [by_hand(c, a) for c, a in oracle.history]
    assert rewards[1] == rewards[2] == max(rewards) > rewards[0]  # a tie, not the accurate one
    assert s.choose(oracle) == oracle.history[1]
    assert s.describe_choice((1,) * 6) == {"predicted_latency_ms": 20.0}
    for cell, acc in oracle.history:
        assert s.reward(cell, acc) == pytest.approx(by_hand(cell, acc), rel=1e-12)
    assert loads == ["lat.pt"]


# --- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, settings, problem", [
    ("reinforce", {"initial": -1}, r"reinforce needs initial >= 0, got -1"),
    ("reinforce", {"baseline_decay": 1.0}, r"reinforce\.baseline_decay must be in \[0, 1\), "
                                           r"got 1\.0"),
    ("reinforce", {"lr": 0.0}, r"reinforce\.lr must be > 0, got 0\.0"),
    ("reinforce", {"latency_predictor": "lat.pt", "latency_target_ms": 0.0},
     r"reinforce\.latency_target_ms must be > 0, got 0\.0"),
    ("gcn", {"lr": 0.0}, r"predictor\.lr must be > 0, got 0\.0"),
    ("comparator", {"epochs": 0}, r"predictor\.epochs must be >= 1, got 0"),
    ("nao", {"growth": -0.5}, r"predictor\.growth must be >= 0, got -0\.5"),
    ("gcn", {"weight_decay": -1e-4}, r"predictor\.weight_decay must be >= 0, got -0\.0001"),
    ("gcn", {"pool": -1}, r"predictor\.pool must be >= 0"),
    ("gcn", {"batch": 0}, r"needs initial >= 2 and batch >= 1, got initial=20, batch=0"),
    ("nao", {"seeds": 0}, r"nao needs seeds >= 1, got 0"),
    ("nao", {"trade_off": -0.1}, r"nao trade_off must be in \[0, 1\], got -0\.1"),
    ("nao", {"step_sizes": [1.0, 0.0]}, r"nao\.step_sizes must be a non-empty list of "
                                        r"positive steps"),
    ("nao", {"embed": 0}, r"nao\.embed must be >= 1, got 0"),
    ("nao", {"hidden": 0}, r"nao\.hidden must be >= 1, got 0"),
    ("rea", {"population": 0}, r"rea needs population >= 1 and sample_size >= 1, got 0, 3"),
])
def test_bad_settings_are_refused_naming_the_setting(name, settings, problem):
    """Each would otherwise fail after queries were spent, or quietly do something else
    (a zero step never moves an embedding, a zero learning rate never fits)."""
    with pytest.raises(ValueError, match=problem):
        create_query_strategy(name, settings)


@pytest.mark.parametrize("name, settings", [
    ("reinforce", {"baseline_decay": 0.0, "initial": 0}),
    ("nao", {"trade_off": 0.0}),
    ("nao", {"trade_off": 1.0, "weight_decay": 0.0, "growth": 0.0}),
    ("gcn", {"pool": 0, "neighbours_of": 0, "weight_decay": 0.0}),
    ("comparator", {"pool": 0, "neighbours_of": 0}),
    ("rea", {"population": 1, "sample_size": 1}),
])
def test_boundary_settings_are_accepted_and_kept(name, settings):
    """0 is a valid decay, trade-off end, pool (the whole space), neighbour count and
    weight decay; 1 is a valid trade-off and population."""
    s = create_query_strategy(name, settings)
    assert {k: getattr(s.config, k) for k in settings} == settings


# --- NAO ------------------------------------------------------------------------------------
def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step written out: gates i, f, g, o."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def nao_by_hand(model: Nao, cells: torch.Tensor, teacher: bool):
    """Encoder outputs and decoder logits of NAO's rule: an LSTM over token + position
    embeddings, outputs scaled to unit norm; the decoder's hidden and cell states both
    start at the normalized mean output, step t reads the start token (t = 0) or token
    t - 1 plus position t, attends by dot products over the outputs and predicts from
    tanh(W [h; context])."""
    enc, dec = model.encoder, model.decoder
    x = model.tokens.weight[cells] + model.positions
    h = c = torch.zeros(len(cells), enc.hidden_size, dtype=x.dtype)
    outs = []
    for t in range(NUM_EDGES):
        h, c = lstm_step(x[:, t], h, c, enc.weight_ih_l0, enc.weight_hh_l0, enc.bias_ih_l0,
                         enc.bias_hh_l0)
        outs.append(h / h.norm(dim=-1, keepdim=True))
    emb = torch.stack(outs, 1)
    mean = emb.mean(1)
    h = c = mean / mean.norm(dim=-1, keepdim=True)
    prev = torch.full((len(cells),), NUM_OPS)
    logits = []
    for t in range(NUM_EDGES):
        inp = model.dec_tokens.weight[prev] + model.positions[t]
        h, c = lstm_step(inp, h, c, dec.weight_ih, dec.weight_hh, dec.bias_ih, dec.bias_hh)
        w = torch.softmax((emb * h[:, None, :]).sum(-1), -1)
        context = (w[:, :, None] * emb).sum(1)
        step = torch.tanh(torch.cat([h, context], -1) @ model.attend.weight.T
                          + model.attend.bias) @ model.out.weight.T + model.out.bias
        logits.append(step)
        prev = cells[:, t] if teacher else step.argmax(-1)
    return emb, torch.stack(logits, 1)


@pytest.mark.parametrize("teacher", [True, False])
def test_nao_encoder_and_decoder_equal_a_replay_by_hand(teacher):
    gen = torch.Generator().manual_seed(3)
    model = seeded_model(gen, lambda: Nao(embed=6, hidden=10)).double()
    with torch.no_grad():  # (zeros at first: a missing position would not show)
        model.positions.normal_(generator=gen)
    cells = torch.from_numpy(all_cells_array()[[0, 7, 4321, 15624, 9000]].copy())
    with torch.no_grad():
        emb_want, logits_want = nao_by_hand(model, cells, teacher)
        emb = model.encode(cells)
        logits = model.decode(emb, cells if teacher else None)
    torch.testing.assert_close(emb, emb_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, logits_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trade_off", [0.0, 0.3, 1.0])
def test_nao_round_loss_weighs_standardized_mse_against_reconstruction(trade_off):
    """``trade_off * MSE(prediction, standardized accuracy) + (1 - trade_off) *
    cross-entropy of the teacher-forced decoding``, over the queried cells."""
    s, model = model_of("nao", embed=8, hidden=12, trade_off=trade_off)
    cells, accs = started(30, 10).data()
    got = s.round_loss(cells, accs, torch.Generator().manual_seed(0))(model)
    x = torch.from_numpy(cells)
    with torch.no_grad():
        emb = model.encode(x)
        pred = model.predict(emb).double().numpy()
        logp = torch.log_softmax(model.decode(emb, x).double(), -1).numpy()
    z = (accs - accs.mean()) / accs.std()
    mse = np.mean((pred - z) ** 2)
    ce = -np.mean(np.take_along_axis(logp, cells[:, :, None], -1))
    assert float(got.detach()) == pytest.approx(trade_off * mse + (1 - trade_off) * ce, rel=1e-5)


def test_nao_retries_the_cells_still_pending_with_the_next_larger_step():
    """A round moves the best cells' per-token embeddings up the predictor's gradient with
    each step size in turn; a cell whose decoding is queried already, or was found by
    another cell this round, is tried again with the next step; the others are done. The
    new cells come ranked by the predicted accuracy."""
    s, model = _nao(seeds=4, batch=1, step_sizes=[0.5, 1.0, 2.0, 3.0])
    oracle = started(40, 8)
    cells, accs = oracle.data()
    top = cells[np.argsort(-accs, kind="stable")[:4]]
    seen = tuple(int(v) for v in top[0])
    fresh = [tuple(int(v) for v in all_cells_array()[c])
             for c in np.flatnonzero(unseen_mask(oracle))[[10, 500, 9000]]]
    u1, u2, u3 = fresh
    plan = {0: {0.5: u1}, 1: {0.5: u1, 1.0: seen, 2.0: u2}, 2: {0.5: seen, 1.0: u3}, 3: {}}
    emb_ref = model.encode(torch.from_numpy(top)).detach().requires_grad_(True)
    grad_ref = torch.autograd.grad(model.predict(emb_ref).sum(), emb_ref)[0]
    calls = []

    def move(emb, grad, eta, renormalize=False):
        rows = [next(i for i in range(4) if torch.allclose(e, emb_ref[i])) for e in emb]
        torch.testing.assert_close(grad, grad_ref[rows])  # up the predicted accuracy
        calls.append((eta, rows))
        return emb + eta * grad

    def decode(moved, cells=None, attention=False):
        eta, rows = calls[-1]
        out = torch.zeros(len(rows), NUM_EDGES, NUM_OPS)
        for r, i in enumerate(rows):
            out[r, torch.arange(NUM_EDGES), torch.tensor(plan[i].get(eta, seen))] = 1.0
        return out

    model.move, model.decode = move, decode
    new = s._propose(model, oracle, cells, accs, 4)
    assert calls == [(0.5, [0, 1, 2, 3]), (1.0, [1, 2, 3]), (2.0, [1, 3]), (3.0, [3])]
    with torch.no_grad():
        pred = {c: float(model.predict(model.encode(torch.tensor([c])))) for c in fresh}
    assert new == sorted(fresh, key=lambda c: -pred[c])


def test_a_nao_round_with_nothing_new_decoded_queries_random_cells():
    """Nothing new decodes: the round queries the round size of seeded random cells
    instead (and says so), so the search goes on."""
    s, model = _nao(batch=3, seeds=3)
    oracle, twin = started(40, 8), started(40, 8)
    s._propose = lambda *args: []
    n = s.query_round(model, oracle, np.random.default_rng(5), *oracle.data())
    query_random(twin, np.random.default_rng(5), 3)
    assert n == 3 and oracle.history == twin.history


@pytest.mark.parametrize("proposed", [5, 0])
def test_a_nao_round_queries_no_more_than_the_budget_left(proposed):
    """Round size 3 with 2 queries left: the first 2 proposals (or random cells) are
    queried, not a BudgetExhausted error."""
    s, model = _nao(batch=3, seeds=3)
    oracle = started(10, 8)
    free = np.flatnonzero(unseen_mask(oracle))[:proposed]
    new = [tuple(int(v) for v in all_cells_array()[c]) for c in free]
    s._propose = lambda *args: list(new)
    assert s.query_round(model, oracle, np.random.default_rng(0), *oracle.data()) == 2
    assert oracle.exhausted
    if proposed:
        assert [c for c, _ in oracle.history[8:]] == new[:2]


# --- the predictor round loop, GCN and comparator ------------------------------------------
class IdleSearch(PredictorSearch):
    """A round loss with nothing to fit (None); rounds of ``batch`` random cells."""

    Config = PredictorConfig

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[int] = []

    def build_model(self):
        return nn.Linear(1, 1)

    def round_loss(self, cells, accs, gen):
        self.calls.append(0)

        def loss(model):
            self.calls[-1] += 1
            return None

        return loss

    def query_round(self, model, oracle, rng, cells, accs):
        return len(query_random(oracle, rng, min(self.config.batch, oracle.remaining)))


def test_a_loss_of_none_ends_the_round_at_once():
    """None means nothing to fit this round: the loss is asked once, not ``epochs``
    times (each ask of the comparator's draws pairs from the run's generator)."""
    s = IdleSearch(PredictorConfig(initial=4, batch=3, epochs=5))
    s.search(QueryOracle(learnable, budget=13), np.random.default_rng(0))
    assert s.calls == [1, 1, 1]


def test_gcn_round_loss_is_the_mse_to_the_standardized_accuracies_of_each_cell():
    """Each queried cell's prediction (its graph alone) against its own standardized
    accuracy."""
    s, model = model_of("gcn", hidden=8, layers=2)
    cells, accs = started(12, 12).data()
    got = s.round_loss(cells, accs, torch.Generator().manual_seed(0))(model)
    with torch.no_grad():
        pred = np.array([float(model(*graph_tensors(cells[k:k + 1]))[0])
                         for k in range(len(cells))])
    z = (accs - accs.mean()) / accs.std()
    assert float(got.detach()) == pytest.approx(np.mean((pred - z) ** 2), rel=1e-5)


def test_comparator_round_loss_labels_a_beats_b_as_1_and_leaves_out_ties():
    """``pairs`` random ordered pairs of queried cells from the run's generator; tied
    pairs left out; binary cross-entropy of logit P(a beats b) against 1 when acc(a) >
    acc(b), written out as softplus."""
    oracle = QueryOracle(lambda cell: float(cell.count(3)), budget=12)  # many ties
    query_random(oracle, np.random.default_rng(0), 12)
    cells, accs = oracle.data()
    s, model = model_of("comparator", hidden=8, layers=2, pairs=40)
    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator().set_state(gen.get_state())
    got = s.round_loss(cells, accs, gen)(model)
    i = torch.randint(len(cells), (40,), generator=replay).numpy()
    j = torch.randint(len(cells), (40,), generator=replay).numpy()
    keep = accs[i] != accs[j]
    assert keep.any() and (~keep).any() and (accs[i] > accs[j]).any() and \
        (accs[i] < accs[j]).any()
    i, j = i[keep], j[keep]
    with torch.no_grad():
        emb = [model.encoder(*graph_tensors(cells[k:k + 1]))[0] for k in range(len(cells))]
        logit = np.array([float(model.compare(emb[a][None], emb[b][None])[0])
                          for a, b in zip(i, j, strict=True)])
    label = accs[i] > accs[j]
    want = np.mean(np.where(label, np.logaddexp(0, -logit), np.logaddexp(0, logit)))
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)


def test_comparator_round_with_every_cell_tied_has_nothing_to_fit():
    oracle = QueryOracle(lambda cell: 70.0, budget=6)
    query_random(oracle, np.random.default_rng(0), 6)
    s, model = model_of("comparator", hidden=4, pairs=20)
    assert s.round_loss(*oracle.data(), torch.Generator().manual_seed(0))(model) is None


def test_candidate_pool_draws_size_distinct_random_unseen_cells():
    """Without neighbours the pool is ``size`` distinct unseen cells, sorted."""
    oracle = started(50, 10)
    pool = candidate_pool(oracle, np.random.default_rng(0), 3000, 0)
    assert len(pool) == len(np.unique(pool)) == 3000
    assert np.all(np.diff(pool) > 0) and unseen_mask(oracle)[pool].all()


@pytest.mark.parametrize("name", ["gcn", "comparator", "nao"])
def test_a_predictors_initial_weights_come_from_the_run_seed(name, monkeypatch):
    """Seed ``s`` twice: the same initial model; another seed: another (the generator is
    seeded from the run's ``rng``, not fixed)."""
    import diffnas.nasbench.strategies.predictor as predictor

    first = []
    real = predictor.seeded_model

    def spy(gen, build):
        model = real(gen, build)
        first.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return model

    monkeypatch.setattr(predictor, "seeded_model", spy)
    settings = {"initial": 4, "batch": 2, "epochs": 1, "hidden": 4}
    if name != "nao":
        settings.update(pool=20, layers=1)
    for seed in (0, 0, 1):
        create_query_strategy(name, settings).search(QueryOracle(learnable, 6),
                                                     np.random.default_rng(seed))
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


# --- CTNAS ------------------------------------------------------------------------------------
class NoProposals(ctnas.Ctnas):
    """CTNAS whose rounds propose nothing (as when every cell is known)."""

    asked = 0

    def proposals(self, policy, oracle, gen, k):
        self.asked += 1
        if self.asked > 3:
            raise RuntimeError("the search went on after a round queried nothing")
        return torch.zeros(0, dtype=torch.long)


def test_ctnas_ends_when_a_round_queries_nothing():
    s = NoProposals(ctnas.CtnasConfig(initial=4, epochs=1, hidden=4, layers=1, pairs=8,
                                      policy_steps=1, policy_batch=2, candidates=2,
                                      explore=0))
    oracle = QueryOracle(learnable, budget=10)
    s.search(oracle, np.random.default_rng(0))
    assert s.asked == 1 and oracle.used == 4

