"""The rules of the NAS-Bench-201 query strategies that a mutation audit could break
without a test failing: each test below states one rule and checks it on a made-up
lookup (no benchmark table needed), by hand where the rule is arithmetic."""

from __future__ import annotations

import sys
import types
from collections import deque

import numpy as np
import pytest
import torch
from conftest import cost_predictor
from test_nb201_bench import FAST, rea_cycles
from torch import nn

from diffnas.nasbench import ApiNb201Table, CsvNb201Table, QueryOracle, create_query_strategy
from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, code_of, random_cell
from diffnas.nasbench.strategies.base import (
    candidate_pool,
    query_random,
    round_size,
    standardize,
)
from diffnas.nasbench.strategies.gcn import GcnPredictorSearch
from diffnas.nasbench.strategies.predictor import (
    PredictorConfig,
    PredictorSearch,
    RankingConfig,
)
from diffnas.spaces.nb201 import NB201_OPS, NUM_CELLS, ops_to_str


def learnable(cell) -> float:
    """The made-up table of test_nb201_bench's ``full_table`` as a lookup (accuracy rises
    with the 3x3 and 1x1 convolutions), with a tie-free tail so every cell's answer
    differs."""
    cell = tuple(int(v) for v in cell)
    return 50 + 5 * cell.count(3) + 2 * cell.count(2) + code_of(cell) / NUM_CELLS


def neighbours(cell) -> set[int]:
    """Codes of the 24 one-edge mutations of ``cell``."""
    out = set()
    for e in range(NUM_EDGES):
        for op in range(NUM_OPS):
            if op != cell[e]:
                m = list(cell)
                m[e] = op
                out.add(code_of(m))
    return out


def started(budget: int, n: int, seed: int = 0) -> QueryOracle:
    """An oracle on ``learnable`` with ``n`` seeded random cells queried."""
    oracle = QueryOracle(learnable, budget)
    query_random(oracle, np.random.default_rng(seed), n)
    return oracle


# --- the encoding -------------------------------------------------------------------------
def test_random_cell_draws_every_op_on_every_edge():
    """Uniform cells: over many draws each of the 5 ops turns up on each of the 6 edges."""
    rng = np.random.default_rng(0)
    cells = np.array([random_cell(rng) for _ in range(500)])
    for e in range(NUM_EDGES):
        assert set(cells[:, e].tolist()) == set(range(NUM_OPS)), e


# --- the table ----------------------------------------------------------------------------
def _str(*ops: str) -> str:
    return ops_to_str(ops)


A = _str("nor_conv_3x3", *("none",) * 5)
B = _str("skip_connect", *("none",) * 5)
C = _str("avg_pool_3x3", *("none",) * 5)


def test_csv_rows_are_placed_by_their_index_column(tmp_path):
    """Rows may come in any order: the index column, not the line, says which cell is
    which benchmark index."""
    path = tmp_path / "t.csv"
    path.write_text(f"index,arch_str,c10_test_200\n2,{A},30.0\n0,{B},10.0\n1,{C},20.0\n")
    t = CsvNb201Table(path)
    assert [t.arch_str(i) for i in range(3)] == [B, C, A]
    assert [t.index_of(s) for s in (A, B, C)] == [2, 0, 1]
    assert t.query(A, "c10_test_200") == 30.0 and t.query(0, "c10_test_200") == 10.0
    assert t.column("c10_test_200").tolist() == [10.0, 20.0, 30.0]


@pytest.mark.parametrize("second", [A, f"  {A} "], ids=["same", "padded"])
def test_csv_refuses_a_cell_listed_twice(second, tmp_path):
    """Two rows of one cell (also when written differently, as the strings are read
    canonically) would give the cell two answers: refused."""
    path = tmp_path / "t.csv"
    path.write_text(f"index,arch_str,c10_test_200\n0,{A},10.0\n1,\"{second}\",20.0\n")
    with pytest.raises(ValueError, match="more than once"):
        CsvNb201Table(path)


@pytest.mark.parametrize("header", ["index,arch_str,c10_test_200,c10_test_200",
                                    "index,arch_str,arch_str,c10_test_200"])
def test_csv_refuses_a_column_listed_twice(header, tmp_path):
    """A header naming a column twice would let the last copy's values win silently."""
    path = tmp_path / "t.csv"
    path.write_text(f"{header}\n0,{A},{A},10.0\n")
    with pytest.raises(ValueError, match=r"column\(s\) (c10_test_200|arch_str) appear more "
                                         "than once"):
        CsvNb201Table(path)


def test_api_backend_caches_per_schedule(monkeypatch, tmp_path):
    """The 12- and 200-epoch results of one cell and dataset are different answers: the
    cache must not hand the first one read to the other, and a repeat is not asked
    again."""
    calls = []

    class FakeApi:
        def __len__(self):
            return 2

        def arch(self, i):
            return [A, B][i]

        def query_index_by_arch(self, s):
            return [A, B].index(s) if s in (A, B) else -1

        def get_more_info(self, index, dataset, iepoch=None, hp="12", is_random=True):
            calls.append((index, dataset, hp))
            return {"test-accuracy": 100 * index + int(hp), "valid-accuracy": -1.0}

    fake = types.ModuleType("nats_bench")
    fake.create = lambda path, space, fast_mode=False, verbose=True: FakeApi()
    monkeypatch.setitem(sys.modules, "nats_bench", fake)
    api = ApiNb201Table(tmp_path / "tss", package="nats_bench")
    assert api.query(1, "c10_test_200") == 300.0
    assert api.query(1, "c10_test_12") == 112.0  # same cell and dataset, other schedule
    assert api.query(1, "c10_test_200") == 300.0
    assert calls == [(1, "cifar10", "200"), (1, "cifar10", "12")]


# --- shared helpers: the candidate pool and the round size --------------------------------
def test_candidate_pool_holds_the_neighbours_of_the_best_cells():
    """Besides ``size`` random unseen cells, the pool holds every unseen one-edge mutation
    of the ``neighbours_of`` best queried cells (not of the worst)."""
    best, second, worst = (3,) * 6, (2,) * 6, (0,) * 6
    answers = {worst: 1.0, best: 9.0, (1,) * 6: 3.0, second: 5.0,
               (2, 3, 3, 3, 3, 3): 2.0}  # (a neighbour of the best, seen)
    oracle = QueryOracle(answers.__getitem__, budget=10)
    for cell in answers:
        oracle.query(cell)
    seen = set(oracle.seen_codes().tolist())
    for k, near in [(1, neighbours(best)), (2, neighbours(best) | neighbours(second))]:
        pool = set(candidate_pool(oracle, np.random.default_rng(0), 1, k).tolist())
        assert near - seen <= pool
        assert not pool & seen
        assert len(pool) <= len(near - seen) + 1  # + the one random cell
    pool = set(candidate_pool(oracle, np.random.default_rng(0), 1, 1).tolist())
    assert len(neighbours(worst) & pool) <= 1


def test_round_size_grows_with_the_cells_queried():
    """``max(batch, int(growth * used))``, by hand."""
    oracle = started(100, 30)
    assert round_size(4, 0.5, oracle) == 15
    assert round_size(4, 0.1, oracle) == 4  # int(3.0) < 4
    assert round_size(20, 0.5, oracle) == 20
    assert round_size(4, 0.0, oracle) == 4


# --- the predictor round loop (GCN, comparator, NAO share it) -----------------------------
class Probe(PredictorSearch):
    """A linear predictor of the op indices; each round queries ``batch`` random cells.
    Records what the loop does with the model and its loss."""

    Config = PredictorConfig

    def __init__(self, config, zero_loss=False, zero_rounds=False):
        super().__init__(config)
        self.zero_loss, self.zero_rounds = zero_loss, zero_rounds
        self.calls: list[int] = []  # loss evaluations per round
        self.weights: list[torch.Tensor] = []  # the weights each loss evaluation saw
        self.mismatch: list[int] = []  # calls whose stored grad was not the last step's own
        self._last: tuple[torch.Tensor, ...] | None = None

    def build_model(self):
        return nn.Linear(NUM_EDGES, 1)

    def round_loss(self, cells, accs, gen):
        x = torch.from_numpy(cells).float()
        y = torch.from_numpy(standardize(accs)).float()
        self.calls.append(0)

        def loss(model):
            self.calls[-1] += 1
            params = tuple(model.parameters())
            self.weights.append(model.weight.detach().clone())
            if self._last is not None and not all(
                    p.grad is not None and torch.equal(p.grad, g)
                    for p, g in zip(params, self._last)):
                self.mismatch.append(sum(self.calls))
            out = model(x).squeeze(-1)
            value = (out * 0).sum() if self.zero_loss else nn.functional.mse_loss(out, y)
            self._last = torch.autograd.grad(value, params, retain_graph=True)
            return value

        return loss

    def query_round(self, model, oracle, rng, cells, accs):
        if self.zero_rounds:
            assert len(self.calls) == 1, "the search went on after a round queried nothing"
            return 0
        return len(query_random(oracle, rng, min(self.config.batch, oracle.remaining)))


def test_each_round_takes_epochs_steps_each_on_its_own_gradient():
    """``epochs`` Adam steps per round, and each step's gradient is that of its own loss
    (the gradients are zeroed in between, not summed over the steps)."""
    probe = Probe(PredictorConfig(initial=4, batch=3, epochs=3))
    probe.search(QueryOracle(learnable, budget=13), np.random.default_rng(0))
    assert probe.calls == [3, 3, 3]  # rounds at 4, 7 and 10 queried cells
    assert probe.mismatch == []


def test_weight_decay_reaches_adam():
    """With a loss of zero gradient only weight decay moves the weights: Adam's first step
    is ``-lr * sign(w)`` with decay and nothing without."""
    for wd in (0.5, 0.0):
        probe = Probe(PredictorConfig(initial=4, batch=3, epochs=2, lr=0.01, weight_decay=wd),
                      zero_loss=True)
        probe.search(QueryOracle(learnable, budget=7), np.random.default_rng(0))
        w0, w1 = probe.weights[:2]
        want = w0 - 0.01 * torch.sign(w0) if wd else w0
        torch.testing.assert_close(w1, want, rtol=0, atol=1e-6)


def test_a_round_that_queries_nothing_ends_the_search():
    """``query_round`` returning 0 stops the search, budget left or not (it would
    otherwise refit and ask again forever)."""
    probe = Probe(PredictorConfig(initial=4, batch=3, epochs=1), zero_rounds=True)
    oracle = QueryOracle(learnable, budget=20)
    probe.search(oracle, np.random.default_rng(0))
    assert len(probe.calls) == 1 and oracle.used == 4


class RankProbe(GcnPredictorSearch):
    """The GCN strategy, recording what each round ranks and how many cells it knew."""

    def __init__(self, config):
        super().__init__(config)
        self.rounds: list[tuple[set[int], tuple, set[int]]] = []

    def scores(self, model, codes, oracle):
        best, _ = oracle.best()
        self.rounds.append((set(codes.tolist()), best, set(oracle.seen_codes().tolist())))
        return super().scores(model, codes, oracle)


def test_ranking_rounds_rank_the_best_cells_neighbours_and_grow():
    """Each round ranks the unseen neighbours of the best cell queried so far (besides
    ``pool`` random ones), and queries ``max(batch, int(growth * used))`` cells: from 8
    cells, rounds of 4, 6, 9 and 13 (the budget's last)."""
    s = RankProbe(RankingConfig(initial=8, batch=2, growth=0.5, epochs=1, pool=1,
                                neighbours_of=1, hidden=4, layers=1))
    oracle = QueryOracle(learnable, budget=40)
    s.search(oracle, np.random.default_rng(0))
    assert [len(seen) for _, _, seen in s.rounds] == [8, 12, 18, 27]
    assert oracle.used == 40
    for codes, best, seen in s.rounds:
        assert neighbours(best) - seen <= codes


# --- GCN and comparator -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gcn", "comparator"])
def test_layers_setting_sets_the_graph_encoders_depth(name):
    for layers in (1, 2, 4):
        model = create_query_strategy(name, {"hidden": 4, "layers": layers}).build_model()
        assert len(model.encoder.fwd) == len(model.encoder.bwd) == layers


def test_gcn_regression_trains_the_graph_encoder():
    """The regression loss reaches the encoder's weights (not only the head's)."""
    s = create_query_strategy("gcn", {"hidden": 8, "layers": 2})
    torch.manual_seed(0)
    model = s.build_model()
    cells, accs = started(12, 12).data()
    s.round_loss(cells, accs, torch.Generator().manual_seed(0))(model).backward()
    for part in (model.encoder, model.head):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_comparator_is_antisymmetric_and_ties_with_the_baseline():
    """logit P(a beats b) = -logit P(b beats a), so a cell against itself is even; and the
    candidates are compared with the best queried cell (which scores 0 against itself)."""
    torch.manual_seed(0)
    s = create_query_strategy("comparator", FAST["comparator"])
    model = s.build_model()
    ea, eb = torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        ab, ba = model.compare(ea, eb), model.compare(eb, ea)
        torch.testing.assert_close(ab, -ba)
        assert ab.abs().min() > 0
        torch.testing.assert_close(model.compare(ea, ea), torch.zeros(5))
        oracle = started(10, 10)
        best = code_of(oracle.best()[0])
        assert best != code_of(oracle.history[0][0])
        scores = s.scores(model, np.array([best, code_of(oracle.history[0][0])]), oracle)
    assert abs(scores[0]) < 1e-7 < abs(scores[1])


# --- NAO ----------------------------------------------------------------------------------
def _nao(**settings):
    s = create_query_strategy("nao", {"embed": 8, "hidden": 16, "growth": 0.0, **settings})
    torch.manual_seed(0)
    return s, s.build_model()


def _spy(model, name):
    """Record the arguments of ``model.<name>`` calls (the method still runs)."""
    calls, real = [], getattr(model, name)

    def spy(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    setattr(model, name, spy)
    return calls


@pytest.mark.parametrize("seeds,batch,moved", [(7, 2, 7), (1, 3, 3)])
def test_nao_moves_the_embeddings_of_the_best_cells(seeds, batch, moved):
    """A round moves the embeddings of the ``max(seeds, round size)`` most accurate cells,
    best first."""
    s, model = _nao(seeds=seeds, batch=batch)
    oracle = started(40, 12)
    cells, accs = oracle.data()
    best_first = sorted(oracle.history, key=lambda t: -t[1])[:moved]
    encoded = _spy(model, "encode")
    s.query_round(model, oracle, np.random.default_rng(0), cells, accs)
    assert encoded[0][0].tolist() == [list(c) for c, _ in best_first]


def test_nao_proposes_best_predicted_first_and_queries_those():
    """The decoded cells come ranked by their predicted accuracy, best first, and a round
    of k queries the first k."""
    s, model = _nao(seeds=7, batch=2)
    oracle = started(40, 12)
    cells, accs = oracle.data()
    new = s._propose(model, oracle, cells, accs, 7)
    with torch.no_grad():
        pred = model.predict(model.encode(torch.tensor(new))).numpy()
    assert len(new) >= 3 and len(set(pred.tolist())) == len(new)
    assert np.all(np.diff(pred) < 0)
    s.query_round(model, oracle, np.random.default_rng(0), cells, accs)
    assert [c for c, _ in oracle.history[12:]] == new[:2]


@pytest.mark.parametrize("renormalize", [True, False])
def test_nao_renormalize_puts_moved_embeddings_back_on_the_unit_sphere(renormalize):
    """The decoder reads the moved per-token embeddings: of unit norm with
    ``renormalize``, off it (``e + eta * grad``) without."""
    s, model = _nao(seeds=5, batch=2, renormalize=renormalize)
    oracle = started(40, 12)
    cells, accs = oracle.data()
    decoded = _spy(model, "decode")
    s.query_round(model, oracle, np.random.default_rng(0), cells, accs)
    norms = torch.cat([args[0].norm(dim=-1).flatten() for args in decoded])
    assert len(decoded) > 0 and all(len(args) == 1 for args in decoded)  # greedy decodes
    off = (norms - 1).abs().max()  # (measured: 1e-7 with, 0.13 without)
    assert off < 1e-5 if renormalize else off > 1e-3


# --- REA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("population", [3, 6])
@pytest.mark.parametrize("sample_size", [1, 200])
def test_rea_population_and_tournament_size(population, sample_size, monkeypatch):
    """The population is the ``population`` most recent cells (it starts with that many
    random ones); a tournament of ``sample_size`` draws: 200 draws from a handful
    always include the best member, which then is the parent; one draw often does not."""
    start, cycles = rea_cycles(monkeypatch, learnable, 60, population, sample_size)
    assert len(start) == population
    pop, weaker = deque(c for c, _ in start), 0
    for parent, child in cycles:
        assert parent in pop
        weaker += learnable(parent) < max(learnable(c) for c in pop)
        pop.append(child)
        if len(pop) > population:
            pop.popleft()
    assert len(cycles) > 20
    assert (weaker == 0) if sample_size == 200 else (weaker > 0)


# --- REINFORCE --------------------------------------------------------------------------
COSTS = {"nor_conv_3x3": 4.0, "nor_conv_1x1": 1.0}  # + 10 ms: cells take 10..34 ms


def _latency(cell) -> float:
    return 10.0 + sum(COSTS.get(NB201_OPS[i], 0.0) for i in cell)


@pytest.fixture
def latency_file(tmp_path):
    path = tmp_path / "lat.pt"
    cost_predictor(list(NB201_OPS), COSTS).save(path)
    return str(path)


@pytest.mark.parametrize("w", [-0.5, (0.0, -1.0), (-0.2, -2.0)])
def test_reinforce_reward_uses_latency_w(w, latency_file):
    """MnasNet's reward ``acc/100 * (latency/target) ** w``, with ``w`` one exponent or
    (at or under the target, above), by hand."""
    s = create_query_strategy("reinforce", {"latency_predictor": latency_file,
                                            "latency_target_ms": 20.0, "latency_w": w})
    for cell in [(3,) * 6, (0,) * 6, (3, 2, 0, 0, 0, 0), (3, 3, 2, 0, 0, 0)]:
        lat = _latency(cell)
        ww = w if isinstance(w, float) else (w[0] if lat <= 20.0 else w[1])
        assert s.reward(cell, 80.0) == pytest.approx(0.8 * (lat / 20.0) ** ww, rel=1e-12)


class SpyRng:
    """A numpy Generator that records the policy rows and draws of ``choice``."""

    def __init__(self, seed):
        self.g = np.random.default_rng(seed)
        self.policies, self.draws = [], []

    def integers(self, *args, **kw):
        return self.g.integers(*args, **kw)

    def permutation(self, *args, **kw):
        return self.g.permutation(*args, **kw)

    def choice(self, n, p):
        self.policies.append(np.array(p, dtype=np.float64))
        self.draws.append(int(self.g.choice(n, p=p)))
        return self.draws[-1]


@pytest.mark.parametrize("with_latency", [False, True])
def test_reinforce_updates_equal_a_replay_by_hand(with_latency, latency_file):
    """Every policy REINFORCE samples from equals a float64 replay written out here: the
    start's batch step ``lr * sum_i (r_i - mean r) onehot(cell_i)`` (the uniform
    policy's part cancels), then one step per sample with advantage ``r - b`` and
    ``b <- decay * b + (1 - decay) * r``; rewards acc/100, or MnasNet's with a latency
    predictor."""
    lr, decay, initial, target, w = 3.0, 0.7, 5, 20.0, -0.5
    settings = {"lr": lr, "baseline_decay": decay, "initial": initial}
    if with_latency:
        settings.update(latency_predictor=latency_file, latency_target_ms=target, latency_w=w)

    def reward(cell):
        r = learnable(cell) / 100.0
        return r * (_latency(cell) / target) ** w if with_latency else r

    def onehot(cell):
        out = np.zeros((NUM_EDGES, NUM_OPS))
        out[np.arange(NUM_EDGES), list(cell)] = 1.0
        return out

    oracle, rng = QueryOracle(learnable, budget=14), SpyRng(0)
    create_query_strategy("reinforce", settings).search(oracle, rng)
    start = [c for c, _ in oracle.history[:initial]]
    rewards = [reward(c) for c in start]
    b = sum(rewards) / initial
    logits = lr * sum((r - b) * onehot(c) for c, r in zip(start, rewards))
    steps = len(rng.draws) // NUM_EDGES
    assert steps >= 9 and len(rng.policies) == steps * NUM_EDGES
    for t in range(steps):
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        got = np.array(rng.policies[t * NUM_EDGES:(t + 1) * NUM_EDGES])
        np.testing.assert_allclose(got, p, rtol=1e-10, atol=1e-13, err_msg=f"step {t}")
        cell = tuple(rng.draws[t * NUM_EDGES:(t + 1) * NUM_EDGES])
        r = reward(cell)
        logits = logits + lr * (r - b) * (onehot(cell) - p)
        b = decay * b + (1 - decay) * r
