"""The rules of the CTNAS query strategy and of the shared query loop (random start,
``query_top``, REA's give-up, the oracle's budget) that a mutation audit broke without a
test failing. Each test states one rule and checks it on a made-up lookup or a hand-made
comparator with known outputs, replayed by hand in float64 where the rule is arithmetic.
(test_nb201_rules.py and test_ctnas.py hold the rules covered before.)"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from test_ctnas import TARGET, smooth_oracle
from test_nb201_rules import learnable, started
from torch import nn

import diffnas.nasbench.strategies.ctnas as ctnas
import diffnas.nasbench.strategies.evolution as evolution
from diffnas.nasbench import QueryOracle, create_query_strategy
from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, all_cells_array, code_of
from diffnas.nasbench.graph import space_graph_tensors
from diffnas.nasbench.strategies.base import (
    candidate_pool,
    query_random,
    query_top,
    seeded_model,
    standardize,
    torch_generator,
    unseen_mask,
)
from diffnas.nasbench.strategies.ctnas import EdgePolicy, codes_of, explore_pairs
from diffnas.spaces.nb201 import NUM_CELLS

SMALL = {"initial": 8, "batch": 5, "growth": 0.25, "policy_steps": 3, "policy_batch": 4,
         "candidates": 6, "proposals": 40, "choice": 3, "explore": 7, "epochs": 2,
         "hidden": 8, "pairs": 16, "entropy_coeff": 0.01, "policy_lr": 0.07}
PLACE = NUM_OPS ** np.arange(NUM_EDGES - 1, -1, -1)


def onehot(cells: np.ndarray) -> np.ndarray:
    """``(n, 6, 5)`` one-hot of op indices."""
    return np.eye(NUM_OPS)[np.asarray(cells)]


class CodeNac(nn.Module):
    """A comparator by hand with tie-free scores: a cell's score is how many edges carry
    TARGET's op plus code * 1e-6; its embedding is (score, code), read from the graph's
    op one-hots (so it embeds any subset of cells); logit = scale * (score(a) - score(b))."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))

    @staticmethod
    def score_np(codes) -> np.ndarray:
        cells = all_cells_array()[np.asarray(codes)]
        return (cells == np.array(TARGET)).sum(-1) + 1e-6 * np.asarray(codes, dtype=np.float64)

    def encoder(self, A_f, A_b, X):
        ops = X[:, 1:NUM_EDGES + 1, 2:].argmax(-1).double()
        code = (ops * torch.from_numpy(PLACE).double()).sum(-1)
        agree = (ops == torch.tensor(TARGET, dtype=torch.float64)).sum(-1).double()
        return torch.stack([agree + 1e-6 * code, code], -1)

    def compare(self, ea, eb):
        return self.scale * (ea[:, 0] - eb[:, 0])


def p_beats(a, b, scale: float = 3.0) -> np.ndarray:
    """P(a beats b) under CodeNac, in float64 numpy."""
    return 1 / (1 + np.exp(-scale * (CodeNac.score_np(a) - CodeNac.score_np(b))))


# --- the policy step -------------------------------------------------------------------------
@pytest.mark.parametrize("decay, ema0", [(None, None), (0.7, None), (0.7, 0.4), (0.0, 0.9)])
def test_policy_steps_equal_a_float64_replay(decay, ema0):
    """One REINFORCE step: loss = -mean((r - b) log pi(a)) - c H(pi), so (SGD) the logits
    move by lr * (mean_i (r_i - b) (onehot_i - p) + c dH); b is 0, or the moving average
    taken *before* this step's update ``b <- decay b + (1 - decay) mean r`` (the first
    step without one is raw)."""
    lr, coeff, steps, batch = 0.3, 0.2, 6, 5
    rewards = torch.rand(NUM_CELLS, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    policy = EdgePolicy().double()
    with torch.no_grad():
        policy.logits.copy_(torch.randn(NUM_EDGES, NUM_OPS, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(1)))
    logits = policy.logits.detach().numpy().copy()
    drawn = []
    real = policy.sample
    policy.sample = lambda n, gen: drawn.append(real(n, gen)) or drawn[-1]
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    ema = ctnas.policy_learning(policy, opt, rewards, steps, batch, coeff,
                                torch.Generator().manual_seed(2), decay, ema0)
    assert len(drawn) == steps and all(d.shape == (batch, NUM_EDGES) for d in drawn)
    b = ema0
    for cells in drawn:
        cells = cells.numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = rewards.numpy()[cells @ PLACE]
        adv = r if decay is None or b is None else r - b
        if decay is not None:
            b = r.mean() if b is None else decay * b + (1 - decay) * r.mean()
        grad_logp = (adv[:, None, None] * (onehot(cells) - p)).mean(0)
        h = -(p * np.log(p)).sum(1, keepdims=True)
        grad_h = -p * (np.log(p) + h)
        logits = logits + lr * (grad_logp + coeff * grad_h)
    np.testing.assert_allclose(policy.logits.detach().numpy(), logits, rtol=1e-10, atol=1e-12)
    assert (ema is None) if decay is None else ema == pytest.approx(b, rel=1e-12)


# --- the curriculum baseline -----------------------------------------------------------------
def test_curriculum_winner_leaves_out_a_cell_against_itself():
    """The mean probability of beating the *others*: what a comparator says of a cell
    against itself does not count (here it would make row 1 the winner: 2.25 > 1.7)."""

    class Table(nn.Module):
        table = torch.tensor([[0.0, 0.8, 0.9], [0.3, 1.0, 0.95], [0.1, 0.2, 0.5]])

        def compare(self, ea, eb):
            return torch.logit(self.table[ea[:, 0].long(), eb[:, 0].long()].clamp(1e-9, 1 - 1e-9))

    assert ctnas.curriculum_winner(Table(), torch.arange(3.0)[:, None]) == 0


# --- data exploration ------------------------------------------------------------------------
@pytest.mark.parametrize("concentrated", [False, True])
def test_explored_pairs_equal_a_replay_by_hand(concentrated):
    """2n policy samples, each paired with the sample at a random permutation of them;
    pairs of one cell twice or of two queried cells dropped (a queried cell with an
    unqueried one stays); the n with the largest |P - 0.5| kept (stable), labelled
    P > 0.5 - confident losers as well as winners."""
    nac, n = CodeNac(), 30
    emb = nac.encoder(*space_graph_tensors())
    policy = EdgePolicy()
    if concentrated:  # mostly a == b pairs: fewer than n pairs are left
        with torch.no_grad():
            policy.logits[:, 0] = 5.0
    seen = np.zeros(NUM_CELLS, dtype=bool)
    seen[codes_of(EdgePolicy().sample(3000, torch.Generator().manual_seed(9))).numpy()] = True
    gen = torch.Generator().manual_seed(4)
    replay = torch.Generator().set_state(gen.get_state())
    a, b, label = explore_pairs(nac, emb, policy, n, seen, gen)
    ra = codes_of(policy.sample(2 * n, replay)).numpy()
    rb = ra[torch.randperm(2 * n, generator=replay).numpy()]
    keep = (ra != rb) & ~(seen[ra] & seen[rb])
    assert (seen[ra] ^ seen[rb])[keep].any()  # a pair with one queried cell stays
    assert (ra == rb).any() == concentrated  # ... and one cell twice goes
    ra, rb = ra[keep], rb[keep]
    p = p_beats(ra, rb)
    top = np.argsort(-np.abs(p - 0.5), kind="stable")[:n]
    assert a.tolist() == ra[top].tolist() and b.tolist() == rb[top].tolist()
    assert label.tolist() == (p[top] > 0.5).astype(float).tolist()
    assert (len(a) < n) if concentrated else (len(a) == n)
    assert 0 < label.sum() < len(label)  # both kinds of label


# --- the search loop, with the comparator replaced by CodeNac ----------------------------
class Spied(ctnas.Ctnas):
    """CTNAS with CodeNac as its NAC (fit_nac records instead of training)."""

    def fit_nac(self, nac, opt, oracle, explored, gen):
        self.fits.append({"explored": [tuple(t.clone() for t in x) for x in explored],
                          "lr": opt.param_groups[0]["lr"],
                          "weight_decay": opt.param_groups[0]["weight_decay"],
                          "used": oracle.used})


def spied_search(monkeypatch, budget: int, seed: int = 0, **settings):
    """Run Spied on the smooth oracle; return the search, the oracle and the records of
    every call of policy_learning, curriculum_winner, query_top and explore_pairs."""
    rec = {"policy": [], "winner": [], "top": [], "explore": []}
    monkeypatch.setattr(ctnas, "Comparator", lambda hidden, layers: CodeNac())
    real_pl, real_cw = ctnas.policy_learning, ctnas.curriculum_winner
    real_qt, real_ex = ctnas.query_top, ctnas.explore_pairs

    def pl(policy, opt, rewards, steps, batch, coeff, gen, decay=None, ema=None):
        out = real_pl(policy, opt, rewards, steps, batch, coeff, gen, decay, ema)
        g = opt.param_groups[0]
        rec["policy"].append({"rewards": rewards.clone(), "steps": steps, "batch": batch,
                              "coeff": coeff, "decay": decay, "ema_in": ema, "ema_out": out,
                              "lr": g["lr"], "betas": g["betas"], "opt": opt})
        return out

    def cw(nac, emb):
        i = real_cw(nac, emb)
        rec["winner"].append((emb[:, 1].long().tolist(), int(emb[i, 1])))
        return i

    def qt(oracle, codes, scores, k):
        rec["top"].append({"codes": np.array(codes), "scores": np.array(scores), "k": k,
                           "used": oracle.used, "unseen": unseen_mask(oracle).copy()})
        return real_qt(oracle, codes, scores, k)

    def ex(nac, emb_all, policy, n, seen, gen):
        rec["explore"].append({"n": n, "seen": seen.copy(), "used": oracle.used})
        out = real_ex(nac, emb_all, policy, n, seen, gen)
        rec["explore"][-1]["out"] = out
        return out

    for name, f in [("policy_learning", pl), ("curriculum_winner", cw), ("query_top", qt),
                    ("explore_pairs", ex)]:
        monkeypatch.setattr(ctnas, name, f)
    search = Spied(ctnas.CtnasConfig(**{**SMALL, **settings}))
    search.fits = []
    oracle = smooth_oracle(budget)
    search.search(oracle, np.random.default_rng(seed))
    return search, oracle, rec


def baseline_of(rewards: torch.Tensor) -> int:
    """The code b with rewards == P(cell beats b) under CodeNac (unique: scores tie-free)."""
    codes = np.arange(NUM_CELLS)
    # P(c beats b) = sigmoid(s(c) - s(b)): the cell with reward 0.5 is b
    b = int(np.argmin(np.abs(rewards.numpy() - 0.5)))
    np.testing.assert_allclose(rewards.numpy(), p_beats(codes, b), rtol=1e-12)
    return b


@pytest.mark.parametrize("seed", [0, 1])
def test_rewards_and_scores_are_against_the_curriculum_baseline(monkeypatch, seed):
    """Round 1's rewards are P(a beats b0), b0 one sample of the uniform initial policy
    (drawn right after the NAC's seed); each later round's rewards, and every round's query
    scores, are against the winner of that round's K = ``candidates`` policy samples."""
    search, oracle, rec = spied_search(monkeypatch, 40, seed)
    rng = np.random.default_rng(seed)
    query_random(QueryOracle(learnable, 100), rng, SMALL["initial"])
    gen = torch_generator(rng)
    torch.randint(2**62, (1,), generator=gen)  # seeded_model's draw
    b0 = int(codes_of(EdgePolicy().sample(1, gen))[0])
    rounds = len(rec["policy"])
    assert rounds >= 3 and len(rec["winner"]) == len(rec["top"]) == rounds
    baselines = [baseline_of(r["rewards"]) for r in rec["policy"]]
    assert baselines[0] == b0
    for t, (pick, winner) in enumerate(rec["winner"]):
        assert len(pick) == SMALL["candidates"]
        # by hand: the largest row sum (the diagonal's 0.5 is the same in every row)
        assert winner == max(pick, key=lambda c: p_beats(c, np.array(pick)).sum())
        if t + 1 < rounds:
            assert baselines[t + 1] == winner
        top = rec["top"][t]
        np.testing.assert_allclose(top["scores"], p_beats(top["codes"], winner), rtol=1e-12)


def test_round_sizes_and_proposals_of_the_search(monkeypatch):
    """Each round queries k = round_size(batch, growth, used) cells, picked from at least
    choice * k unseen proposals, until the budget is spent."""
    search, oracle, rec = spied_search(monkeypatch, 45)
    assert oracle.used == 45
    for top in rec["top"]:
        k = max(SMALL["batch"], int(SMALL["growth"] * top["used"]))
        assert top["k"] == k
        assert len(top["codes"]) >= SMALL["choice"] * k
        assert len(set(top["codes"].tolist())) == len(top["codes"])
        assert top["unseen"][top["codes"]].all()
    assert any(top["k"] > SMALL["batch"] for top in rec["top"])  # growth took over


def test_policy_settings_and_the_reward_baseline_reach_the_policy(monkeypatch):
    """One Adam over the policy (lr ``policy_lr``, betas (0.5, 0.999)) kept across rounds;
    ``policy_steps`` steps of ``policy_batch`` with ``entropy_coeff``; the moving average
    carried from one round into the next (it starts unset)."""
    _, _, rec = spied_search(monkeypatch, 40, reward_baseline_decay=0.8)
    pol = rec["policy"]
    assert len(pol) >= 3
    for t, r in enumerate(pol):
        assert (r["steps"], r["batch"]) == (SMALL["policy_steps"], SMALL["policy_batch"])
        assert r["coeff"] == SMALL["entropy_coeff"] and r["decay"] == 0.8
        assert r["lr"] == SMALL["policy_lr"] and r["betas"] == (0.5, 0.999)
        assert r["opt"] is pol[0]["opt"]
        assert r["ema_in"] == (None if t == 0 else pol[t - 1]["ema_out"])
        assert r["ema_out"] is not None


def test_nac_optimizer_settings(monkeypatch):
    """The NAC's Adam has the ``lr`` and ``weight_decay`` settings."""
    search, _, _ = spied_search(monkeypatch, 25, lr=0.004, weight_decay=0.03)
    assert search.fits and all(f["lr"] == 0.004 and f["weight_decay"] == 0.03
                               for f in search.fits)


def test_exploration_accumulates_and_knows_the_queried_cells(monkeypatch):
    """After each round's queries ``explore`` pairs are explored with the cells queried so
    far as ``seen``; every later NAC fit gets all pairs explored before it."""
    search, oracle, rec = spied_search(monkeypatch, 40)
    order = [c for c, _ in oracle.history]
    ex = rec["explore"]
    assert len(ex) >= 2
    for e in ex:
        assert e["n"] == SMALL["explore"]
        want = np.zeros(NUM_CELLS, dtype=bool)
        want[[code_of(c) for c in order[:e["used"]]]] = True
        assert np.array_equal(e["seen"], want)
    for t, fit in enumerate(search.fits):
        assert len(fit["explored"]) == t
        for got, e in zip(fit["explored"], ex, strict=False):
            assert all(torch.equal(x, y) for x, y in zip(got, e["out"], strict=True))


def test_proposals_are_policy_samples_not_only_the_top_up():
    """``proposals`` samples from a uniform policy give about that many distinct unseen
    cells, well beyond choice * k (no top-up needed)."""
    s = create_query_strategy("ctnas", {"proposals": 300, "choice": 1})
    oracle = started(100, 10)
    codes = s.proposals(EdgePolicy(), oracle, torch.Generator().manual_seed(0), 5)
    assert len(codes) > 250
    assert unseen_mask(oracle)[codes.numpy()].all()


def test_proposals_top_up_with_other_cells_than_the_samples():
    """A half-concentrated policy: 10 samples give a few distinct cells, all among the
    most probable; the top-up adds the most probable *other* unseen cells, so the list
    holds choice * k distinct cells: the samples and then the next most probable."""
    s = create_query_strategy("ctnas", {"proposals": 10, "choice": 4})
    policy = EdgePolicy()
    with torch.no_grad():
        policy.logits[:, 0] = 3.0
    oracle = started(100, 10)
    gen = torch.Generator().manual_seed(0)
    replay = torch.Generator().set_state(gen.get_state())
    codes = s.proposals(policy, oracle, gen, 5).tolist()
    sampled = sorted(set(codes_of(policy.sample(10, replay)).tolist()))
    unseen = unseen_mask(oracle)
    sampled = [c for c in sampled if unseen[c]]
    logp = policy.log_prob(torch.tensor(all_cells_array())).detach().double().numpy()
    others = [c for c in np.argsort(-logp, kind="stable").tolist()
              if unseen[c] and c not in sampled]
    assert len(sampled) < 20 and codes == sampled + others[:20 - len(sampled)]


# --- the NAC's training batches --------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.5, 2.0])
def test_nac_batches_equal_a_replay_by_hand(ratio, monkeypatch):
    """``epochs`` steps; each takes ``pairs`` random ordered pairs of queried cells less
    the ties, labelled acc(a) > acc(b), plus int(explore_ratio * pairs) random explored
    pairs with their labels (a, b in that order)."""
    s = create_query_strategy("ctnas", {"epochs": 3, "pairs": 12, "explore_ratio": ratio})
    flat = {code_of(c) for c in [(1,) * 6, (2,) * 6]}  # two cells that tie
    oracle = QueryOracle(lambda c: 7.0 if code_of(c) in flat else learnable(c), 20)
    oracle.query((1,) * 6)
    oracle.query((2,) * 6)
    query_random(oracle, np.random.default_rng(0), 8)
    explored = [(torch.tensor([5, 77, 900]), torch.tensor([6, 78, 901]), torch.tensor([1., 0, 1])),
                (torch.tensor([3000]), torch.tensor([12]), torch.tensor([0.]))]
    ea, eb, el = (torch.cat(t) for t in zip(*explored, strict=True))
    batches = []

    def bce(logits, target):
        batches.append((logits.detach().clone(), target.clone()))
        return real_bce(logits, target)

    real_bce = nn.functional.binary_cross_entropy_with_logits
    monkeypatch.setattr(nn.functional, "binary_cross_entropy_with_logits", bce)
    nac = CodeNac()
    pairs_seen = []
    real_compare = nac.compare
    nac.compare = lambda a, b: pairs_seen.append((a[:, 1].long(), b[:, 1].long())) or \
        real_compare(a, b)
    opt = torch.optim.SGD(nac.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator().set_state(gen.get_state())
    s.fit_nac(nac, opt, oracle, explored, gen)
    cells, accs = oracle.data()
    codes = cells @ PLACE
    assert len(batches) == len(pairs_seen) == 3
    for (_, target), (left, right) in zip(batches, pairs_seen, strict=True):
        i = torch.randint(len(codes), (12,), generator=replay).numpy()
        j = torch.randint(len(codes), (12,), generator=replay).numpy()
        keep = accs[i] != accs[j]
        i, j = i[keep], j[keep]
        want_l, want_r = list(codes[i]), list(codes[j])
        want_t = list((accs[i] > accs[j]).astype(float))
        n_ex = int(ratio * 12)
        if n_ex:
            e = torch.randint(len(ea), (n_ex,), generator=replay)
            want_l += ea[e].tolist()
            want_r += eb[e].tolist()
            want_t += el[e].tolist()
        assert left.tolist() == want_l and right.tolist() == want_r
        assert target.tolist() == want_t


def test_an_explored_pair_whose_cells_were_queried_since_is_no_longer_trained_on(monkeypatch):
    """A pair explored in an earlier round keeps its pseudo-label only while one of its
    cells is unqueried: once both are, their true order is labelled data, and the label
    the NAC guessed (here the wrong one) must not be trained on any more."""
    s = create_query_strategy("ctnas", {"epochs": 4, "pairs": 8, "explore_ratio": 4.0})
    oracle = QueryOracle(learnable, 20)
    a, b = (1,) * 6, (2,) * 6
    wrong = float(not learnable(a) > learnable(b))
    explored = [(torch.tensor([code_of(a), 5]), torch.tensor([code_of(b), 6]),
                 torch.tensor([wrong, 1.0]))]
    oracle.query(a)
    oracle.query(b)  # both cells of the first explored pair are queried since
    query_random(oracle, np.random.default_rng(0), 6)
    nac = CodeNac()
    pairs_seen = []
    real_compare = nac.compare
    nac.compare = lambda x, y: pairs_seen.append((x[:, 1].long(), y[:, 1].long())) or \
        real_compare(x, y)
    s.fit_nac(nac, torch.optim.SGD(nac.parameters(), lr=0.0), oracle, explored,
              torch.Generator().manual_seed(0))
    explored_drawn = [(int(x), int(y)) for left, right in pairs_seen
                      for x, y in zip(left[-32:], right[-32:], strict=True)]
    assert len(pairs_seen) == 4 and explored_drawn.count((5, 6)) == 4 * 32
    assert (code_of(a), code_of(b)) not in explored_drawn


@pytest.mark.parametrize("settings, name", [
    ({"epochs": 0}, "ctnas.epochs"),
    ({"batch": 0}, "ctnas.batch"),
    ({"pairs": 0}, "ctnas.pairs"),
    ({"hidden": 0}, "ctnas.hidden"),
    ({"layers": 0}, "ctnas.layers"),
    ({"policy_steps": 0}, "ctnas.policy_steps"),
    ({"lr": 0.0}, "ctnas.lr"),
    ({"growth": -0.1}, "ctnas.growth"),
    ({"weight_decay": -1e-4}, "ctnas.weight_decay"),
    ({"explore": -1}, "ctnas.explore"),
    ({"reward_baseline_decay": -0.1}, "ctnas.reward_baseline_decay"),
])
def test_more_bad_ctnas_settings_name_the_setting(settings, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + " must be"):
        create_query_strategy("ctnas", settings)


def test_ctnas_boundary_settings_are_accepted():
    """0 is a valid entropy bonus, growth, weight decay, exploration and EMA decay."""
    s = create_query_strategy("ctnas", {"entropy_coeff": 0.0, "growth": 0.0,
                                        "weight_decay": 0.0, "explore": 0,
                                        "explore_ratio": 0.0, "reward_baseline_decay": 0.0})
    assert s.config.reward_baseline_decay == 0.0 and s.config.explore == 0


# --- the shared helpers ----------------------------------------------------------------------
def test_query_random_falls_back_to_a_random_order_of_the_unseen_cells():
    """When ``max_tries`` draws are spent, the rest are the unseen cells in the order of
    one ``rng.permutation`` - exactly ``n`` of them, no more."""
    oracle = started(50, 4)
    unseen = unseen_mask(oracle)
    out = query_random(oracle, np.random.default_rng(7), 6, max_tries=0)
    order = np.random.default_rng(7).permutation(np.flatnonzero(unseen))[:6]
    assert [code_of(c) for c, _ in out] == order.tolist()
    assert oracle.used == 10 and [a for _, a in out] == [learnable(c) for c, _ in out]


def test_query_top_queries_the_k_best_unseen_with_ties_by_lower_code():
    """Highest scores first, ties by lower code, seen cells skipped and not counted: the
    return value is the number of new cells, exactly k."""
    oracle = QueryOracle(learnable, 50)
    oracle.query(all_cells_array()[40])
    codes = np.array([90, 40, 70, 10, 30, 20, 60])
    scores = np.array([0.9, 5.0, 0.5, 0.5, 0.5, 0.1, 0.5])
    assert query_top(oracle, codes, scores, 3) == 3
    assert oracle.seen_codes().tolist() == [40, 90, 10, 30]


def test_candidate_pool_of_size_zero_is_every_unseen_cell():
    oracle = started(50, 5)
    pool = candidate_pool(oracle, np.random.default_rng(0), 0, 2)
    assert pool.tolist() == np.flatnonzero(unseen_mask(oracle)).tolist()


def test_models_are_seeded_without_touching_torchs_global_rng():
    state = torch.get_rng_state()
    a = seeded_model(torch.Generator().manual_seed(5), lambda: nn.Linear(3, 2))
    assert torch.equal(torch.get_rng_state(), state)
    b = seeded_model(torch.Generator().manual_seed(5), lambda: nn.Linear(3, 2))
    assert torch.equal(a.weight, b.weight)


def test_standardize_gives_zero_mean_and_unit_spread_even_for_close_accuracies():
    """(y - mean) / std, the 1e-8 only guarding a zero spread: accuracies as fractions
    (spread of a few hundredths) still come out with std 1."""
    y = np.array([learnable(c) for c, _ in started(20, 12).history]) / 100
    assert 0.005 < y.std() < 0.1
    z = standardize(y)
    assert abs(z.mean()) < 1e-12 and z.std() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(z * y.std() + y.mean(), y, rtol=1e-6)


# --- REA, random search and the oracle -----------------------------------------------------
class PickRng:
    """A numpy Generator that records REA's tournament draws (``size=`` 4)."""

    def __init__(self, seed: int) -> None:
        self.g = np.random.default_rng(seed)
        self.picks: list[list[int]] = []

    def integers(self, *args, **kw):
        out = self.g.integers(*args, **kw)
        if kw.get("size") == 4:
            self.picks.append(out.tolist())
        return out

    def permutation(self, *args, **kw):
        return self.g.permutation(*args, **kw)


def test_rea_tournament_ties_go_to_the_oldest_sampled_member(monkeypatch):
    """The parent is the fittest sampled member; among equally fit ones the one that
    entered the population first (replayed on a fitness with many ties)."""
    cycles = []
    real = evolution.mutate
    monkeypatch.setattr(evolution, "mutate",
                        lambda cell, rng: cycles.append((cell, real(cell, rng))) or cycles[-1][1])

    def fitness(cell):
        return float(cell.count(3))

    rng = PickRng(0)
    oracle = QueryOracle(fitness, 40)
    create_query_strategy("rea", {"population": 8, "sample_size": 4}).search(oracle, rng)
    pop, mattered = deque(c for c, _ in oracle.history[:8]), 0
    assert len(rng.picks) == len(cycles) > 30
    for picks, (parent, child) in zip(rng.picks, cycles, strict=True):
        members = [pop[i] for i in sorted(picks)]
        best = max(fitness(c) for c in members)
        tied = [c for c in members if fitness(c) == best]
        assert parent == tied[0]
        mattered += len(set(tied)) > 1
        pop.append(child)
        if len(pop) > 8:
            pop.popleft()
    assert mattered >= 5


@pytest.mark.parametrize("factor, budget", [(1, 12), (3, 5)])
def test_rea_gives_up_after_max_cycles_factor_times_the_budget(factor, budget, monkeypatch):
    """Children that were all seen before cost nothing: the search stops after exactly
    ``max_cycles_factor * budget`` cycles, with the budget unspent."""
    calls = []

    def same(cell, rng):
        calls.append(cell)
        if len(calls) > 10 * factor * budget:
            raise RuntimeError("REA did not give up")
        return cell  # a seen cell: free

    monkeypatch.setattr(evolution, "mutate", same)
    oracle = QueryOracle(learnable, budget)
    create_query_strategy("rea", {"population": 3, "max_cycles_factor": factor}).search(
        oracle, np.random.default_rng(0))
    assert len(calls) == factor * budget and oracle.used == 3


def test_a_tournament_of_no_one_is_refused():
    """(population 0 and max_cycles_factor 0 are checked in test_nb201_bench.py)"""
    with pytest.raises(ValueError, match="sample_size >= 1, got 10, 0"):
        create_query_strategy("rea", {"sample_size": 0})


@pytest.mark.parametrize("budget", [0, -3])
def test_an_oracle_without_budget_is_refused(budget):
    with pytest.raises(ValueError, match=f"budget must be >= 1, got {budget}"):
        QueryOracle(learnable, budget)
