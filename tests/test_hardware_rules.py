"""Rules of the latency-aware search code that no other test pins down: the predictor's
output scale (``mean + std * z``, mean and std of the training targets) and the op
fractions its MLP reads, the anchored fitting target, Kendall's tau; the quartiles and the
per-call time a measurement reports and the seeded shuffle of its rounds; a dataset
record's ratio to the anchor; FLOPs of cells that repeat an edge; and a latency penalty
whose predictor stays frozen while alpha gets the gradient through it."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch
from conftest import cost_predictor, tiny_batch, tiny_space, tiny_strategy
from scipy import stats as scipy_stats
from test_latency import _hand_flops, _synthetic_records
from torch import nn

from diffnas.genotype import CellGenotype, Edge, Genotype
from diffnas.hardware import costs, latency
from diffnas.hardware.dataset import (
    anchor_genotype,
    anchored_latencies,
    build_dataset,
    genotype_key,
    load_records,
)
from diffnas.hardware.latency import LatencySettings, LatencyStats, measure_latency, measure_many
from diffnas.hardware.penalty import LatencyPenalty
from diffnas.hardware.predictor import (
    LatencyPredictor,
    encode_records,
    fit_predictor,
    kendall_tau,
    space_shapes,
    split_by_architecture,
)
from diffnas.report.cost import count_flops
from diffnas.supernet.network import DartsNetwork

OPS = ["a", "b", "c"]  # columns of a hand-built one-cell-type predictor (6 edges)


def _rows(indices: list[int], n_ops: int) -> torch.Tensor:
    """One-hot rows, one per edge: the op index of each edge."""
    return nn.functional.one_hot(torch.tensor(indices), n_ops).float()


# --- the predictor: mean + std * z, op fractions, anchored target, Kendall's tau ----------

def test_predictor_output_is_mean_plus_std_times_z_and_both_travel_with_the_file(tmp_path):
    """z = base + the op costs of the cell (exactly, by construction); the prediction in ms
    is mean_ms + std_ms * z, computed by hand, also for a batch and after save/load."""
    p = cost_predictor(OPS, {"a": 1.0, "b": 3.0}, base=0.5)
    with torch.no_grad():
        p.mean_ms.fill_(4.0)
        p.std_ms.fill_(2.0)
    cells = torch.stack([_rows([0, 1, 1, 2, 0, 1], 3),  # a: 2, b: 3 -> z = 11.5
                         _rows([2] * 6, 3)])  # c only -> z = 0.5
    want = torch.tensor([4.0 + 2.0 * 11.5, 4.0 + 2.0 * 0.5])
    torch.testing.assert_close(p({"cell": cells}), want)
    p.save(tmp_path / "p.pt")
    torch.testing.assert_close(LatencyPredictor.load(tmp_path / "p.pt")({"cell": cells}), want)
    assert p.ref_ms == 4.0  # the penalty's unit is the mean, not the std


def test_fit_normalises_by_the_mean_and_sample_std_of_the_training_targets():
    space = tiny_space()
    records = _synthetic_records(space, 12)
    model, _ = fit_predictor(records, space, target="raw", epochs=1)
    train, _ = split_by_architecture(records, 0.2, 0)  # the fit's own split (seed 0)
    ys = [records[i]["latency_ms"] for i in train.tolist()]
    assert len(ys) < len(records)  # the held-out records must not shift the scale
    assert float(model.mean_ms) == pytest.approx(statistics.mean(ys), rel=1e-6)
    assert float(model.std_ms) == pytest.approx(statistics.stdev(ys), rel=1e-5)


def test_fit_is_unit_free_latencies_times_1000_give_predictions_times_1000():
    """Normalising targets by their mean and std (and a relative loss) makes the fit
    independent of the unit: the same steps in z, predictions scaled by the same factor."""
    space = tiny_space()
    records = _synthetic_records(space, 12)
    scaled = [{**r, "latency_ms": 1000.0 * r["latency_ms"]} for r in records]
    m1, r1 = fit_predictor(records, space, target="raw", epochs=30)
    m2, r2 = fit_predictor(scaled, space, target="raw", epochs=30)
    x = encode_records(records, space)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), 1000.0 * m1(x), rtol=1e-4, atol=0.0)
    assert r2["heldout_mre"] == pytest.approx(r1["heldout_mre"], rel=1e-3)


def test_the_mlp_reads_op_counts_divided_by_the_edges_of_their_cell_type():
    """Two cell types with 5 and 2 edges (3 ops each); an MLP wired to pass one input
    column through, the linear parts zeroed: the output is that op's fraction of the
    edges of its own cell type."""
    shapes = {"normal": (5, 3), "reduce": (2, 3)}
    w = {"normal": _rows([0, 1, 1, 2, 1], 3), "reduce": _rows([1, 1], 3)}
    p = LatencyPredictor(shapes, hidden=4)
    _, counts, fractions = p.features(w)
    torch.testing.assert_close(counts, torch.tensor([1.0, 3.0, 1.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(fractions, torch.tensor([0.2, 0.6, 0.2, 0.0, 1.0, 0.0]))

    def through(column: int) -> float:
        with torch.no_grad():
            for t in itertools.chain(p.linear.parameters(), p.mlp.parameters()):
                t.zero_()
            p.mlp[0].weight[0, column] = 1.0
            p.mlp[2].weight[0, 0] = 1.0
            p.mlp[4].weight[0, 0] = 1.0
            return float(p.normalized(w))

    assert through(1) == pytest.approx(3 / 5)  # op 1 on 3 of the 5 normal edges
    assert through(4) == pytest.approx(2 / 2)  # op 1 on both reduce edges
    assert through(3) == 0.0


def _loaded_records(space):
    """Records whose true latency is ``lat`` (anchor: 2 ms), 4 of 12 measured under a 3x
    load: raw medians ``3 lat``, anchor 6 ms, the same ratio lat / 2. The median anchor is
    2 ms, so the anchored latency is ``lat`` exactly."""
    out, true = [], []
    for i, r in enumerate(_synthetic_records(space, 12)):
        load = 3.0 if i % 3 == 0 else 1.0
        true.append(r["latency_ms"])
        out.append({**r, "latency_ms": load * r["latency_ms"], "anchor_ms": 2.0 * load,
                    "ratio": r["latency_ms"] / 2.0})
    return out, true


def test_fit_targets_the_anchored_latency_by_default_and_raw_medians_on_request():
    space = tiny_space()
    records, true = _loaded_records(space)
    raw = [r["latency_ms"] for r in records]
    assert anchored_latencies(records) == pytest.approx(true)
    train = split_by_architecture(records, 0.2, 0)[0].tolist()
    model, report = fit_predictor(records, space, epochs=1)  # default target
    assert report["target"] == "anchored"
    assert report["latency_ms_range"] == pytest.approx([min(true), max(true)], rel=1e-6)
    assert float(model.mean_ms) == pytest.approx(statistics.mean(true[i] for i in train),
                                                 rel=1e-6)
    model, report = fit_predictor(records, space, target="raw", epochs=1)
    assert report["target"] == "raw"
    assert report["latency_ms_range"] == pytest.approx([min(raw), max(raw)], rel=1e-6)
    assert float(model.mean_ms) == pytest.approx(statistics.mean(raw[i] for i in train),
                                                 rel=1e-6)


def test_anchored_latency_is_the_ratio_times_the_median_anchor_of_the_file():
    records = [{"ratio": 1.5, "anchor_ms": 1.0, "latency_ms": 9.0},
               {"ratio": 2.0, "anchor_ms": 2.0, "latency_ms": 9.0},
               {"ratio": 0.5, "anchor_ms": 10.0, "latency_ms": 9.0},
               {"latency_ms": 7.0}]  # no anchor: its raw median
    # median anchor 2 (the mean would be 4.33; each record's own anchor 1.5, 4, 5)
    assert anchored_latencies(records) == pytest.approx([3.0, 4.0, 1.0, 7.0])


def _tau_a(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a by counting pairs: (concordant - discordant) / all pairs; a pair
    tied in either list counts as neither."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    concordant = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    discordant = sum((a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return (concordant - discordant) / len(pairs)


@pytest.mark.parametrize(("a", "b", "want"), [
    ([1, 2, 3], [1, 2, 3], 1.0),
    ([1, 2, 3], [3, 2, 1], -1.0),
    ([1, 2, 3], [1, 3, 2], 1 / 3),  # 2 concordant, 1 discordant of 3 pairs
    ([1, 1, 2], [1, 2, 3], 2 / 3),  # a tie counts 0 but stays in the 3 pairs (tau-a)
    ([1, 1, 2, 2], [1, 1, 1, 2], 2 / 6),  # ties in both: 2 concordant of 6 pairs
    ([4, 1, 3, 2], [2, 1, 4, 3], 2 / 6),  # 4 concordant, 2 discordant
])
def test_kendall_tau_equals_hand_counts(a, b, want):
    assert _tau_a(a, b) == pytest.approx(want)  # the pair count agrees with the hand value
    got = kendall_tau(torch.tensor(a, dtype=torch.float), torch.tensor(b, dtype=torch.float))
    assert got == pytest.approx(want)
    assert kendall_tau(torch.tensor(b, dtype=torch.float),
                       torch.tensor(a, dtype=torch.float)) == pytest.approx(want)


def test_kendall_tau_without_ties_matches_scipy():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randperm(9, generator=g).float(), torch.randperm(9, generator=g).float()
        assert kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)


# --- measuring: per-call times, quartiles, a new seeded order each round ------------------

class _FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _Costed(nn.Module):
    """Each forward call advances ``clock`` by its next cost (seconds)."""

    def __init__(self, clock: _FakeClock, costs_s: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.clock, self.costs = clock, list(costs_s)

    def forward(self, x):
        self.clock.now += self.costs.pop(0)
        return x


def test_measure_reports_per_call_times_and_their_inclusive_quartiles(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setitem(latency.CLOCKS, "wall", clock)
    per_call_ms = [8.0, 1.0, 16.0, 2.0, 4.0]  # one timed sample each, in timing order
    # 4 calls a sample, uneven around their mean: the sample is their mean, not their sum
    m = _Costed(clock, [ms / 1000 * f for ms in per_call_ms for f in (0.5, 1.5, 1.25, 0.75)])
    st = measure_latency(m, (1,), LatencySettings(warmup=0, repeats=5, calls_per_sample=4))
    assert not m.costs  # every cost was spent in a timed call
    assert st.samples_ms == pytest.approx(per_call_ms)
    # sorted 1, 2, 4, 8, 16: the inclusive quartiles are the 2nd and 4th sample
    # (the exclusive method would give 1.5 and 12)
    assert (st.q25_ms, st.median_ms, st.q75_ms) == pytest.approx((2.0, 4.0, 8.0))


def test_latency_stats_quartiles_interpolate_between_samples():
    st = LatencyStats.from_samples([0.004, 0.001, 0.003, 0.002])
    # positions 0.75, 1.5, 2.25 of 1, 2, 3, 4 ms
    assert (st.q25_ms, st.median_ms, st.q75_ms) == pytest.approx((1.75, 2.5, 3.25))
    assert st.samples_ms == pytest.approx([4.0, 1.0, 3.0, 2.0])  # timing order kept


class _Tagged(nn.Module):
    def __init__(self, tag: int, order: list[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.tag, self.order = tag, order

    def forward(self, x):
        self.order.append(self.tag)
        return x


def _rounds(seed: int, n: int = 4, repeats: int = 8) -> list[tuple[int, ...]]:
    order: list[int] = []
    measure_many([_Tagged(i, order) for i in range(n)], (1,),
                 LatencySettings(warmup=0, repeats=repeats), seed=seed)
    return [tuple(order[i:i + n]) for i in range(0, n * repeats, n)]


def test_each_round_times_the_models_in_a_new_seeded_random_order():
    rounds = _rounds(0)
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)  # one sample of each per round
    assert len(set(rounds)) > 1  # not one order for all rounds (a fixed position bias)
    assert _rounds(0) == rounds  # reproducible under its seed
    assert _rounds(1) != rounds  # and the seed is used


def test_genotype_costs_reports_the_measured_median_and_quartiles(monkeypatch):
    space = tiny_space()
    st = LatencyStats(4.0, 2.0, 8.0, [8.0, 2.0, 4.0])
    monkeypatch.setattr(costs, "measure_latency", lambda *a, **k: st)
    out = costs.genotype_costs(space, anchor_genotype(space), (1, 8, 8))
    assert (out["latency_q25_ms"], out["latency_ms"], out["latency_q75_ms"]) == (2.0, 4.0, 8.0)


# --- the dataset: each record's ratio to the anchor timed in the same rounds -------------

def test_dataset_ratio_is_the_median_of_per_round_ratios_to_the_anchor(tmp_path, monkeypatch):
    """measure_many stubbed: one architecture per chunk, timed with the anchor network
    (built from ``anchor_genotype``); samples chosen so that the median of per-round
    ratios differs from the ratio of medians, their mean and the inverse ratio."""
    space = tiny_space()
    anchor_key = genotype_key(anchor_genotype(space))
    built: dict[int, str] = {}
    real_build = space.build_network

    def build(g, **kw):
        m = real_build(g, **kw)
        built[id(m)] = genotype_key(g)
        return m

    chunks = iter([  # (samples of the architecture, of the anchor), ms, round by round
        ([2.0, 8.0, 30.0], [1.0, 4.0, 3.0]),  # ratios 2, 2, 10 -> 2 (medians: 8 / 3)
        ([4.0, 1.0, 20.0], [1.0, 2.0, 4.0]),  # ratios 4, 0.5, 5 -> 4 (medians: 4 / 2)
        ([5.0, 5.0, 5.0], [10.0, 10.0, 10.0]),  # ratio 0.5
    ])

    def stats(ms):
        return LatencyStats(statistics.median(ms), min(ms), max(ms), list(ms))

    def fake_measure(models, input_shape, settings, seed=0):
        is_anchor = [built[id(m)] == anchor_key for m in models]
        assert len(models) == 2 and sum(is_anchor) == 1  # in whichever place
        arch, anchor = next(chunks)
        return [stats(anchor if a else arch) for a in is_anchor]

    monkeypatch.setattr(space, "build_network", build)
    monkeypatch.setattr("diffnas.hardware.dataset.measure_many", fake_measure)
    path = tmp_path / "lat.jsonl"
    build_dataset(space, path, 3, (1, 8, 8), {}, LatencySettings(warmup=0, repeats=3), chunk=1)
    records = load_records(path)
    assert [r["ratio"] for r in records] == pytest.approx([2.0, 4.0, 0.5])
    assert [r["anchor_ms"] for r in records] == [3.0, 2.0, 10.0]  # the anchor's medians
    assert [(r["q25_ms"], r["latency_ms"], r["q75_ms"]) for r in records] == [
        (2.0, 8.0, 30.0), (1.0, 4.0, 20.0), (5.0, 5.0, 5.0)]
    # load-corrected: ratio x the median anchor of the file (3 ms)
    assert anchored_latencies(records) == pytest.approx([6.0, 12.0, 1.5])


# --- costs: a cell that repeats an edge (same input twice, same op twice) --------------------

def _repeating_genotype(node3: tuple[Edge, ...]) -> Genotype:
    normal = CellGenotype("normal", (Edge("sep_conv_3x3", 0, 2), Edge("conv_7x1_1x7", 0, 2),
                                     *node3), (2, 3))
    reduce = CellGenotype("reduce", (Edge("max_pool_3x3", 0, 2), Edge("max_pool_3x3", 1, 2),
                                     Edge("max_pool_3x3", 0, 3), Edge("max_pool_3x3", 2, 3)),
                          (2, 3))
    return Genotype("darts_cnn", (normal, reduce))


def test_flops_by_op_names_each_op_of_a_repeated_edge_in_order():
    """Node 2 takes input 0 twice (sep_conv_3x3, then conv_7x1_1x7), node 3 takes input 1
    twice through sep_conv_3x3: every module is counted under its own op (one normal cell
    at C=4, 8x8, as in the hand FLOP counts; the reduce cells only pool). Parsed genotypes
    refuse a repeated edge; a network built from one directly is still costed."""
    g = _repeating_genotype((Edge("sep_conv_3x3", 1, 3), Edge("sep_conv_3x3", 1, 3)))
    model = DartsNetwork(g, 4, 3, 3, False, in_channels=1, stem_multiplier=1)
    by_op = costs.flops_by_op(model, g, (1, 8, 8))
    sep, conv7 = _hand_flops("sep_conv_3x3", 1), _hand_flops("conv_7x1_1x7", 1)
    assert sep != conv7  # a swap of the two ops on edge 0->2 would show
    assert by_op["sep_conv_3x3"] == 3 * sep and by_op["conv_7x1_1x7"] == conv7
    assert by_op["max_pool_3x3"] == 0 and by_op["other"] > 0
    assert sum(by_op.values()) == count_flops(model, (1, 8, 8))
    # the genotype lists one op fewer on edge 1->3 than the network holds
    fewer = _repeating_genotype((Edge("sep_conv_3x3", 1, 3),))
    with pytest.raises(ValueError, match="edge 1->3 that the genotype does not have"):
        costs.flops_by_op(model, fewer, (1, 8, 8))


# --- the penalty: a frozen predictor, alpha's gradient through it ------------------------

def test_latency_penalty_freezes_its_predictor_and_passes_gradient_to_alpha(tmp_path):
    """lam * (mean + std * z(softmax(alpha))) / mean with z linear in the op counts: the
    gradient in alpha[e, k] is lam * std / mean * s_ek (c_k - sum_j c_j s_ej), by hand; the
    predictor's parameters take no gradient (given as an object or as a file)."""
    c = {"a": 1.0, "b": 3.0, "c": -0.5}
    p = cost_predictor(OPS, c, base=0.5)
    with torch.no_grad():
        p.mean_ms.fill_(4.0)
        p.std_ms.fill_(2.0)
    p.save(tmp_path / "p.pt")
    cost = torch.tensor([c[o] for o in OPS])
    for given in (p, str(tmp_path / "p.pt")):
        pen = LatencyPenalty(given, lam=0.5, input="probs")
        assert all(not t.requires_grad for t in pen.predictor.parameters())
        alpha = torch.randn(6, 3, generator=torch.Generator().manual_seed(0),
                            requires_grad=True)
        value = pen({"cell": torch.softmax(alpha, -1)}, {"cell": alpha})
        assert value.requires_grad  # a graph back to alpha
        value.backward()
        assert all(t.grad is None for t in pen.predictor.parameters())
        s = torch.softmax(alpha.detach(), -1)
        want = 0.5 * 2.0 / 4.0 * s * (cost - (s * cost).sum(-1, keepdim=True))
        torch.testing.assert_close(alpha.grad, want)


def test_a_search_step_leaves_the_latency_predictor_as_it_was(tmp_path):
    """SNAS (one backward pass through weights, alphas and the penalty): the alphas move,
    the predictor's parameters neither change nor collect a gradient."""
    space = tiny_space()
    path = tmp_path / "p.pt"
    torch.manual_seed(0)
    LatencyPredictor(space_shapes(space), hidden=4, mean_ms=5.0, std_ms=2.0).save(path)
    s = tiny_strategy({"name": "snas", "penalties": [
        {"name": "latency", "predictor": str(path), "lam": 5.0, "input": "probs"}]}, space)
    pred = s.penalties[0][1].predictor
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    alphas = [a.detach().clone() for a in s.alphas()]
    s.step(tiny_batch(4, 1), None)
    assert any(not torch.equal(a, b) for a, b in zip(alphas, s.alphas(), strict=True))
    assert all(t.grad is None for t in pred.parameters())
    for k, v in pred.state_dict().items():
        assert torch.equal(v, before[k]), k
