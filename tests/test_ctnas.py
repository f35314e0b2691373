"""The CTNAS strategy: its policy, baseline curriculum, data exploration and budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffnas.nasbench import QueryOracle, create_query_strategy
from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, code_of
from diffnas.nasbench.graph import space_graph_tensors
from diffnas.nasbench.strategies.ctnas import (
    EdgePolicy,
    beats,
    codes_of,
    curriculum_winner,
    explore_pairs,
    policy_learning,
)
from diffnas.spaces.nb201 import NB201_OPS

TABLE = Path(__file__).resolve().parents[2] / "shared/data/nb201/nb201_compact.csv.gz"
FAST = {"initial": 8, "batch": 6, "epochs": 5, "hidden": 16, "pairs": 64,
        "policy_steps": 10, "proposals": 50, "explore": 20}
TARGET = (3, 1, 4, 2, 3, 0)  # an arbitrary cell the hand-made comparator prefers
CONV3 = NB201_OPS.index("nor_conv_3x3")


def smooth_oracle(budget: int) -> QueryOracle:
    """Accuracy = the number of nor_conv_3x3 edges (a property a graph encoder sees) plus
    a small code term that breaks ties."""
    return QueryOracle(lambda cell: float(sum(op == CONV3 for op in cell) + 1e-5 * code_of(cell)),
                       budget)


class HandNac(nn.Module):
    """A comparator by hand: a cell's score is how many of its edges carry TARGET's op;
    logit P(a beats b) = scale * (score(a) - score(b))."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))  # so it has parameters, never used
        onehot = torch.zeros(NUM_EDGES, NUM_OPS)
        onehot[torch.arange(NUM_EDGES), torch.tensor(TARGET)] = 1.0
        self.register_buffer("target", onehot)

    def encoder(self, A_f, A_b, X):
        ops = X[:, 1:NUM_EDGES + 1, 2:]  # op node k <- edge k's op one-hot
        return (ops * self.target).sum((1, 2))[:, None]

    def compare(self, ea, eb):
        return self.scale * (ea - eb).squeeze(-1)


def space_embedding(nac: nn.Module) -> torch.Tensor:
    return nac.encoder(*space_graph_tensors())


def test_hand_comparator_scores_by_agreement():
    emb = space_embedding(HandNac())
    assert emb[code_of(TARGET), 0] == NUM_EDGES
    assert emb[code_of((0,) * NUM_EDGES), 0] == 1  # edge 5 agrees (op 0)


def test_policy_moves_toward_the_cell_the_comparator_prefers():
    nac = HandNac()
    emb = space_embedding(nac)
    baseline = code_of((0, 0, 0, 0, 0, 0))
    rewards = beats(nac, emb, emb[baseline])
    gen = torch.Generator().manual_seed(0)
    policy = EdgePolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=0.05, betas=(0.5, 0.999))
    before = policy.probs()[torch.arange(NUM_EDGES), torch.tensor(TARGET)].detach().clone()
    # the paper's rule: the raw reward (no moving average), every edge moves toward TARGET
    policy_learning(policy, opt, rewards, steps=100, batch=10, entropy_coeff=5e-4, gen=gen)
    after = policy.probs().detach()[torch.arange(NUM_EDGES), torch.tensor(TARGET)]
    assert torch.all(after > before + 0.1), after
    # with a moving-average reward baseline it gets there: TARGET is the policy's mode
    policy2 = EdgePolicy()
    opt2 = torch.optim.Adam(policy2.parameters(), lr=0.05, betas=(0.5, 0.999))
    ema = policy_learning(policy2, opt2, rewards, 100, 10, 5e-4, gen, decay=0.9)
    assert ema is not None and 0.5 < ema < 1.0
    assert tuple(policy2.probs().argmax(1).tolist()) == TARGET


def test_policy_log_prob_and_entropy_match_the_distribution():
    policy = EdgePolicy()
    with torch.no_grad():
        policy.logits.copy_(torch.randn(NUM_EDGES, NUM_OPS,
                                        generator=torch.Generator().manual_seed(1)))
    cells = torch.tensor([TARGET, (0,) * 6])
    p = policy.probs()
    ref = torch.log(p[torch.arange(NUM_EDGES), cells]).sum(1)
    assert torch.allclose(policy.log_prob(cells), ref, atol=1e-6)
    dist = torch.distributions.Categorical(probs=p)
    assert torch.allclose(policy.entropy(), dist.entropy().sum(), atol=1e-6)
    assert codes_of(cells).tolist() == [code_of(TARGET), 0]


def test_baseline_update_picks_the_comparators_winner():
    nac = HandNac()
    emb = space_embedding(nac)
    cells = [(0, 0, 0, 0, 0, 0), (3, 1, 4, 0, 0, 0), (3, 1, 4, 2, 3, 1), (3, 0, 0, 0, 0, 0)]
    codes = torch.tensor([code_of(c) for c in cells])
    assert curriculum_winner(nac, emb[codes]) == 2  # 5 of 6 edges agree
    twice = torch.tensor([code_of(c) for c in (cells[1], cells[2], cells[0], cells[2])])
    assert curriculum_winner(nac, emb[twice]) == 1  # ties: the first winner

    class Cyclic(nn.Module):
        """Not transitive: a > b > c > a, and d loses to all; P from a table."""

        table = torch.tensor([[0.0, 0.9, 0.2, 0.9], [0.1, 0.0, 0.9, 0.9],
                              [0.8, 0.1, 0.0, 0.9], [0.1, 0.1, 0.1, 0.0]])

        def compare(self, ea, eb):
            p = self.table[ea[:, 0].long(), eb[:, 0].long()]
            return torch.logit(p.clamp(1e-6, 1 - 1e-6))

    rows = torch.arange(4.0)[:, None]
    # mean P of beating the others: a 0.667, b 0.633, c 0.6, d 0.1 -> a
    assert curriculum_winner(Cyclic(), rows) == 0
    Cyclic.table[2, 3] = 1.0
    Cyclic.table[2, 0] = 0.95  # c: (0.95 + 0.1 + 1.0) / 3 = 0.683 -> c
    assert curriculum_winner(Cyclic(), rows) == 2


def test_exploration_labels_pairs_by_the_comparator_and_skips_queried_pairs():
    nac = HandNac(scale=1.0)
    emb = space_embedding(nac)
    policy = EdgePolicy()
    gen = torch.Generator().manual_seed(2)
    seen = np.zeros(len(emb), dtype=bool)
    sampled = codes_of(policy.sample(3000, torch.Generator().manual_seed(3)))
    seen[sampled.numpy()] = True
    a, b, label = explore_pairs(nac, emb, policy, 40, seen, gen)
    assert len(a) == 40
    assert torch.all(a != b)
    assert not torch.any(torch.from_numpy(seen)[a] & torch.from_numpy(seen)[b])
    score = emb[:, 0]
    assert torch.equal(label, (score[a] > score[b]).float())  # no ties kept: confident
    margin = (score[a] - score[b]).abs()
    assert margin.min() >= 1  # the most confident pairs: never an even pair


def strategy(**settings):
    return create_query_strategy("ctnas", {**FAST, **settings})


def test_same_seed_same_search_and_other_seed_differs():
    runs = []
    state = torch.get_rng_state()
    for seed in (5, 5, 6):
        oracle = smooth_oracle(40)
        strategy().search(oracle, np.random.default_rng(seed))
        runs.append([cell for cell, _ in oracle.history])
        torch.manual_seed(seed + 100)  # the global RNG is not a source: changing it is harmless
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    torch.set_rng_state(state)


@pytest.mark.parametrize("budget, settings", [
    (37, {}),  # rounds of 6 and 20% do not divide 37 - 8
    (23, {"proposals": 1, "batch": 4}),  # one sample per round: the list is topped up
    (30, {"explore": 0, "reward_baseline_decay": 0.9}),
])
def test_spends_the_budget_exactly(budget, settings):
    oracle = smooth_oracle(budget)
    strategy(**settings).search(oracle, np.random.default_rng(1))
    assert oracle.used == budget
    assert len({cell for cell, _ in oracle.history}) == budget


def test_starts_with_the_shared_random_cells():
    a, b = smooth_oracle(20), smooth_oracle(20)
    strategy().search(a, np.random.default_rng(4))
    create_query_strategy("random").search(b, np.random.default_rng(4))
    assert a.history[:FAST["initial"]] == b.history[:FAST["initial"]]


def test_queries_drift_toward_better_cells():
    """On the smooth oracle the policy-guided rounds beat the shared random start."""
    oracle = smooth_oracle(60)
    strategy(epochs=20).search(oracle, np.random.default_rng(0))
    _, accs = oracle.data()
    start, later = np.floor(accs[:FAST["initial"]]), np.floor(accs[-20:])
    assert later.mean() > start.mean() + 1.5, (start, later)
    assert later.max() >= 5  # at least 5 of 6 edges nor_conv_3x3


def test_explored_pairs_train_the_comparator_when_labels_all_tie():
    from diffnas.nasbench.strategies.base import query_random
    from diffnas.nasbench.strategies.comparator import Comparator

    flat = QueryOracle(lambda cell: 50.0, budget=10)
    query_random(flat, np.random.default_rng(0), 10)
    search = strategy(epochs=40)
    torch.manual_seed(0)
    nac = Comparator(8, 2)
    opt = torch.optim.Adam(nac.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in nac.parameters()]
    search.fit_nac(nac, opt, flat, [], gen)  # every pair ties, nothing explored: no step
    assert all(torch.equal(p, q) for p, q in zip(before, nac.parameters(), strict=True))
    a, b = torch.tensor([code_of(TARGET)]), torch.tensor([0])
    search.fit_nac(nac, opt, flat, [(a, b, torch.ones(1))], gen)
    emb = nac.encoder(*space_graph_tensors())
    assert beats(nac, emb[a], emb[b]).item() > 0.9  # learned from the explored pair alone


@pytest.mark.parametrize("settings, name", [
    ({"policy_lr": 0.0}, "ctnas.policy_lr"),
    ({"candidates": 1}, "ctnas.candidates"),
    ({"initial": 1}, "ctnas.initial"),
    ({"entropy_coeff": -1e-3}, "ctnas.entropy_coeff"),
    ({"reward_baseline_decay": 1.0}, "ctnas.reward_baseline_decay"),
    ({"explore_ratio": -0.5}, "ctnas.explore_ratio"),
    ({"proposals": 0}, "ctnas.proposals"),
    ({"policy_batch": 0}, "ctnas.policy_batch"),
])
def test_bad_settings_name_the_setting(settings, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        create_query_strategy("ctnas", settings)


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="unknown config key"):
        create_query_strategy("ctnas", {"controller": "lstm"})


@pytest.mark.skipif(not TABLE.is_file(), reason=f"NAS-Bench-201 table not found at {TABLE}")
def test_on_the_table_reads_only_validation_and_spends_the_budget():
    from diffnas.nasbench import SEARCH_METRIC, CsvNb201Table, make_oracle

    table = CsvNb201Table(TABLE)
    reads = []
    inner = table._value

    def spy(index, metric):
        reads.append(metric)
        return inner(index, metric)

    table._value = spy
    oracle = make_oracle(table, budget=30)
    strategy().search(oracle, np.random.default_rng(0))
    assert oracle.used == 30 and set(reads) == {SEARCH_METRIC} and len(reads) == 30


@pytest.mark.parametrize("choice", [1, 4])
def test_the_comparator_chooses_from_choice_times_k_unseen_cells(choice):
    """A concentrated policy samples few distinct cells: the proposals are filled up with
    its most probable unseen cells to choice * k, so the NAC still picks k of many (with
    choice 1 the list held exactly k, and every proposal was queried)."""
    policy = EdgePolicy()
    with torch.no_grad():
        policy.logits[:, CONV3] = 8.0  # nearly every sample is the all-conv3 cell
    oracle = smooth_oracle(100)
    oracle.query((CONV3,) * NUM_EDGES)
    strategy = create_query_strategy("ctnas", {**FAST, "choice": choice})
    codes = strategy.proposals(policy, oracle, torch.Generator().manual_seed(0), 5)
    assert len(codes) == len(set(codes.tolist())) == choice * 5
    assert code_of((CONV3,) * NUM_EDGES) not in codes.tolist()
    logp = policy.log_prob(torch.stack([torch.tensor([c // NUM_OPS ** (5 - e) % NUM_OPS
                                                      for e in range(NUM_EDGES)])
                                        for c in codes.tolist()]))
    assert (logp > -9.0).all()  # one edge off the mode each: the most probable unseen
