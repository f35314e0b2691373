"""Hardware-aware search: FLOP counts against hand counts, latency timing rules, the
latency dataset, the predictor, the penalty hook (gradients reach alpha) and the reward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    TINY_SHAPE,
    cost_predictor,
    locked_elsewhere,
    tiny_batch,
    tiny_space,
    tiny_strategy,
)
from torch import nn

from diffnas.hardware.costs import flops_by_op
from diffnas.hardware.dataset import (
    build_dataset,
    encode_indices,
    load_records,
    one_hot,
    sample_genotype,
)
from diffnas.hardware.latency import LatencySettings, measure_latency, measure_many, synchronizer
from diffnas.hardware.penalty import LatencyPenalty, mnasnet_reward
from diffnas.hardware.predictor import LatencyPredictor, fit_predictor, space_shapes
from diffnas.ops import create_op
from diffnas.report.cost import count_flops, count_macs
from diffnas.strategies.hypergrad import first_order, unrolled

C, H = 4, 8  # op inputs (1, C, H, H)


def _hand_flops(name: str, stride: int) -> int:
    """FLOPs (2 per MAC) of convolutions and matrix products, counted by hand."""
    o = H // stride  # output side
    dw = lambda k, side: C * side * side * k * k  # noqa: E731  depthwise k x k
    pw = lambda side: C * C * side * side  # noqa: E731  pointwise 1x1, C -> C
    macs = {
        ("sep_conv_3x3", 1): 2 * (dw(3, o) + pw(o)),  # two (depthwise, pointwise) blocks
        ("sep_conv_5x5", 2): (dw(5, o) + pw(o)) * 2,  # first block strided, second at o
        ("dil_conv_5x5", 2): dw(5, o) + pw(o),
        ("skip_connect", 2): 2 * (C * (C // 2) * o * o),  # FactorizedReduce: 2 x 1x1 convs
        ("skip_connect", 1): 0,
        ("max_pool_3x3", 1): 0,
        ("avg_pool_3x3", 2): 0,
        ("conv_7x1_1x7", 1): 2 * (C * C * 7 * o * o),
        ("nor_conv_3x3", 1): C * C * 9 * o * o,
    }[(name, stride)]
    return 2 * macs


@pytest.mark.parametrize("name,stride", [
    ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("dil_conv_5x5", 2), ("skip_connect", 2),
    ("skip_connect", 1), ("max_pool_3x3", 1), ("avg_pool_3x3", 2), ("conv_7x1_1x7", 1),
    ("nor_conv_3x3", 1),
])
def test_op_flops_equal_hand_counts(name, stride):
    assert count_flops(create_op(name, C, stride, True), (C, H, H)) == _hand_flops(name, stride)


def test_flops_by_op_of_a_network_adds_up():
    from diffnas.genotype import CellGenotype, Edge, Genotype

    # tiny space: 3 cells at C=4, cell 0 normal at 8x8, cells 1 and 2 reduce
    normal = CellGenotype("normal", (Edge("sep_conv_3x3", 0, 2), Edge("skip_connect", 1, 2),
                                     Edge("max_pool_3x3", 0, 3), Edge("sep_conv_3x3", 2, 3)),
                          (2, 3))
    reduce = CellGenotype("reduce", (Edge("max_pool_3x3", 0, 2), Edge("max_pool_3x3", 1, 2),
                                     Edge("max_pool_3x3", 0, 3), Edge("max_pool_3x3", 2, 3)),
                          (2, 3))
    g = Genotype("darts_cnn", (normal, reduce))
    space = tiny_space()
    model = space.build_network(g)
    by_op = flops_by_op(model, g, (1, 8, 8))
    assert sum(by_op.values()) == count_flops(model, (1, 8, 8))
    assert by_op["sep_conv_3x3"] == 2 * _hand_flops("sep_conv_3x3", 1)
    assert by_op["skip_connect"] == 0 and by_op["max_pool_3x3"] == 0
    assert by_op["other"] > 0  # stem, preprocessing, classifier


def test_flops_by_op_names_nb201_ops_by_their_edge():
    from diffnas.genotype import CellGenotype, Edge, Genotype
    from diffnas.spaces import DataShape, create_space

    # listed out of the cell's (dst, src) order: naming by position would mislabel them
    edges = (Edge("nor_conv_1x1", 2, 3), Edge("nor_conv_3x3", 0, 1), Edge("none", 1, 3),
             Edge("skip_connect", 0, 2), Edge("avg_pool_3x3", 1, 2), Edge("nor_conv_3x3", 0, 3))
    g = Genotype("nb201", (CellGenotype("cell", edges, (3,)),))
    space = create_space({"name": "nb201", "C": C, "N": 1}, DataShape(1, H, 10))
    model = space.build_network(g)
    by_op = flops_by_op(model, g, (1, H, H))
    # one cell per stage: C channels at HxH, 2C at H/2, 4C at H/4; every stage has the
    # same 3x3 cost (channels^2 x side^2 is constant), 2 FLOPs per MAC
    conv3 = sum(2 * (C * 2**s) ** 2 * 9 * (H // 2**s) ** 2 for s in range(3))
    conv1 = sum(2 * (C * 2**s) ** 2 * (H // 2**s) ** 2 for s in range(3))
    assert by_op["nor_conv_3x3"] == 2 * conv3 and by_op["nor_conv_1x1"] == conv1
    assert by_op["skip_connect"] == by_op["none"] == by_op["avg_pool_3x3"] == 0
    assert by_op["other"] > 0  # stem, reduction blocks, classifier
    assert sum(by_op.values()) == count_flops(model, (1, H, H))


class _Probe(nn.Module):
    """Records the thread count and mode seen in forward, and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls, self.threads, self.modes = 0, set(), set()

    def forward(self, x):
        self.calls += 1
        self.threads.add(torch.get_num_threads())
        self.modes.add(self.training)
        return self.lin(x)


def test_measure_fixes_threads_warms_up_and_restores():
    before = torch.get_num_threads()
    m = _Probe().train()
    s = LatencySettings(batch_size=2, warmup=3, repeats=5, threads=1, calls_per_sample=2)
    stats = measure_latency(m, (3,), s)
    assert m.calls == 3 + 5 * 2
    assert m.threads == {1} and m.modes == {False}
    assert m.training and torch.get_num_threads() == before
    assert len(stats.samples_ms) == 5
    assert stats.q25_ms <= stats.median_ms <= stats.q75_ms


def test_measure_many_interleaves_rounds():
    order = []

    class Tagged(_Probe):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            order.append(self.tag)
            return super().forward(x)

    models = [Tagged(i) for i in range(3)]
    measure_many(models, (3,), LatencySettings(warmup=0, repeats=4, threads=1))
    # every round times each model once before any model is timed again
    rounds = [sorted(order[i:i + 3]) for i in range(0, 12, 3)]
    assert rounds == [[0, 1, 2]] * 4


def test_cpu_timing_does_not_touch_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("synchronize called on CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    synchronizer(torch.device("cpu"))()
    measure_latency(_Probe(), (3,), LatencySettings(warmup=1, repeats=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_synchronises(monkeypatch):
    real = torch.cuda.synchronize
    calls = []

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(torch.cuda, "synchronize", counting)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU()).cuda()
    measure_latency(model, (256,), LatencySettings(warmup=2, repeats=3))
    assert len(calls) == 2 * (2 + 3)  # before and after every timed call


def test_dataset_records_extend_and_encode(tmp_path):
    space = tiny_space()
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=2)
    build_dataset(space, path, 3, (1, 8, 8), {}, s, chunk=2)
    build_dataset(space, path, 2, (1, 8, 8), {}, s, chunk=2)
    records = load_records(path)
    assert len(records) == 5
    assert len({json.dumps(r["genotype"], sort_keys=True) for r in records}) == 5
    for r in records:
        from diffnas.genotype import Genotype

        g = Genotype.from_dict(r["genotype"])
        space.validate(g)
        assert r["encoding"] == encode_indices(g, space)
        w = one_hot(r["encoding"], space)
        kept = sum(len(c.edges) for c in g.cells)
        none_idx = space.edges()[0].candidates.index("none")
        assert all(torch.equal(v.sum(-1), torch.ones(len(v))) for v in w.values())
        assert sum(int((v.argmax(-1) != none_idx).sum()) for v in w.values()) == kept
        assert r["latency_ms"] > 0 and r["ratio"] > 0 and r["settings"]["repeats"] == 2
    fp = records[0]["device"]["id"]
    assert len(load_records(path, fp)) == 5
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(path.read_bytes() + '{"note": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin}: this latency dataset file is not UTF-8 "
                                         r"text \(byte 0xe9 on line 6\)"):
        load_records(latin)
    with pytest.raises(ValueError, match=f"no record of device 'other'; its devices: {fp}"):
        load_records(path, "other")


def _synthetic_records(space, n, seed=0):
    """Latency = 2 ms + a fixed cost per (group, op) of every kept edge: known answer."""
    g = torch.Generator().manual_seed(seed)
    cost = {grp: torch.rand(len(es[0].candidates), generator=g)
            for grp, es in space.edge_groups().items()}
    fp = {"id": "synthetic"}
    out = []
    for _ in range(n):
        geno = sample_genotype(space, g)
        enc = encode_indices(geno, space)
        lat = 2.0 + sum(float(cost[grp][i]) for grp, idx in enc.items() for i in idx if i >= 0)
        out.append({"genotype": geno.to_dict(), "encoding": enc, "latency_ms": lat,
                    "device": fp, "settings": {}})
    return out


def test_fit_predictor_recovers_a_known_latency_model():
    space = tiny_space()
    records = _synthetic_records(space, 200)
    model, report = fit_predictor(records, space, epochs=400, target="raw")
    assert report["heldout"] == 40
    assert report["heldout_mre"] < 0.02 < report["mean_baseline_heldout_mre"]
    # the same numbers when the file is saved and loaded
    w = one_hot(records[0]["encoding"], space)
    assert torch.allclose(model(w), model(w))


def test_fit_rejects_mixed_devices():
    space = tiny_space()
    records = _synthetic_records(space, 12)
    records[0] = {**records[0], "device": {"id": "other"}}
    with pytest.raises(ValueError, match="devices"):
        fit_predictor(records, space)


def test_fit_rejects_records_measured_with_other_settings():
    space = tiny_space()
    records = _synthetic_records(space, 12)
    for r in records:
        r["settings"] = {"batch_size": 1, "clock": "thread", "repeats": 15}
    records[5] = {**records[5], "settings": {**records[5]["settings"], "batch_size": 8}}
    with pytest.raises(ValueError, match="batch_size: 1 vs 8"):
        fit_predictor(records, space, epochs=2)
    # repeats only change the precision of a median: such records may be fitted together
    records[5] = {**records[5], "settings": {**records[5]["settings"], "batch_size": 1,
                                             "repeats": 31}}
    assert fit_predictor(records, space, epochs=2)[1]["records"] == 12


def test_fit_refuses_a_holdout_that_leaves_too_few_to_train():
    space = tiny_space()
    with pytest.raises(ValueError, match="leaves 1 of 10 records to train on"):
        fit_predictor(_synthetic_records(space, 10), space, holdout=0.9, epochs=2)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("mlp_decay", float("nan"), "mlp_decay must be a finite number >= 0"),
    ("edge_decay", -1.0, "edge_decay must be a finite number >= 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("hidden", 0, "hidden must be >= 1"),
])
def test_fit_refuses_bad_options_before_fitting(option, value, message):
    """A NaN decay or an empty MLP would save a predictor that predicts NaN."""
    space = tiny_space()
    with pytest.raises(ValueError, match=message):
        fit_predictor(_synthetic_records(space, 12), space, epochs=2, **{option: value})


def test_fit_refuses_a_diverged_predictor():
    space = tiny_space()
    with pytest.raises(FloatingPointError, match="fit diverged"):
        fit_predictor(_synthetic_records(space, 12), space, epochs=3, lr=1e20)


@pytest.mark.parametrize("damage", ["truncated", "junk", "not_a_predictor"])
def test_a_damaged_predictor_file_is_named(tmp_path, damage):
    path, _ = _predictor_file(tmp_path, tiny_space())
    raw = path.read_bytes()
    if damage == "not_a_predictor":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"junk" * 30)
    with pytest.raises(ValueError, match=f"{path}.*(unreadable|not a latency predictor)"):
        LatencyPredictor.load(path)


def test_dataset_refuses_to_mix_settings_in_one_file(tmp_path):
    space = tiny_space()
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=2)
    build_dataset(space, path, 2, (1, 8, 8), {}, s, chunk=2)
    for shape, network, settings, what in [
        ((1, 8, 8), {}, LatencySettings(warmup=0, repeats=2, batch_size=2), "batch_size"),
        ((1, 4, 4), {}, s, "input_shape"),
        ((1, 8, 8), {"C": 8}, s, "network"),
    ]:
        with pytest.raises(ValueError, match=f"other settings.*{what}"):
            build_dataset(space, path, 1, shape, network, settings)
    assert len(load_records(path)) == 2  # nothing was appended
    build_dataset(space, path, 1, (1, 8, 8), {}, LatencySettings(warmup=1, repeats=3))
    assert len(load_records(path)) == 3


def _predictor_file(tmp_path, space):
    torch.manual_seed(0)
    p = LatencyPredictor(space_shapes(space), hidden=16, mean_ms=5.0, std_ms=2.0)
    path = tmp_path / "pred.pt"
    p.save(path)
    return path, LatencyPredictor.load(path)


@pytest.mark.parametrize("rule", ["first_order", "unrolled"])
def test_latency_gradient_reaches_alpha(tmp_path, rule):
    """grad_alpha of (task loss + lam * pred(softmax(alpha)) / ref) = the task gradient
    plus the predictor's gradient through the softmax, computed independently."""
    space = tiny_space()
    path, pred = _predictor_file(tmp_path, space)
    lam = 0.7
    pen = {"name": "latency", "predictor": str(path), "lam": lam}
    section = {"name": "darts", "order": 1 if rule == "first_order" else 2}
    if rule == "unrolled":
        section["hessian"] = "exact"
    dt = torch.float64
    plain = tiny_strategy(section, space, dtype=dt)
    withp = tiny_strategy({**section, "penalties": [pen]}, space, dtype=dt)
    train, val = tiny_batch(4, 1, dt), tiny_batch(4, 2, dt)
    fn = first_order if rule == "first_order" else unrolled
    g0, _ = fn(plain, train, val)
    g1, stats = fn(withp, train, val)
    alphas = withp.alphas()
    ref_pen = lam * pred({grp: torch.softmax(a, -1) for grp, a in withp.arch_params.as_dict()
                          .items()}) / pred.ref_ms
    expected = torch.autograd.grad(ref_pen.sum(), alphas)
    assert stats["penalty_latency"] == pytest.approx(ref_pen.item(), rel=1e-5)
    for a, b, e in zip(g0, g1, expected, strict=True):
        assert e.abs().max() > 1e-4  # the predictor's gradient is not trivially zero
        assert torch.allclose(b - a, e.to(dt), atol=1e-6)


def test_probs_input_uses_the_sampling_distribution(tmp_path):
    """input=probs ignores the (sampled) weights and uses softmax(logits): SNAS's
    expected resource cost; input=weights uses the weights it is given."""
    space = tiny_space()
    path, pred = _predictor_file(tmp_path, space)
    logits = {g: torch.randn(e, o) for g, (e, o) in space_shapes(space).items()}
    sample = {g: torch.nn.functional.one_hot(torch.randint(0, o, (e,)), o).float()
              for g, (e, o) in space_shapes(space).items()}
    probs = {g: torch.softmax(a, -1) for g, a in logits.items()}
    p_probs = LatencyPenalty(str(path), lam=1.0, input="probs", normalize=False)
    p_w = LatencyPenalty(str(path), lam=1.0, input="weights", normalize=False)
    assert torch.allclose(p_probs(sample, logits), pred(probs))
    assert torch.allclose(p_w(sample, logits), pred(sample))


def test_penalty_config_errors(tmp_path):
    space = tiny_space()
    path, _ = _predictor_file(tmp_path, space)
    with pytest.raises(ValueError, match="input"):
        LatencyPenalty(str(path), input="expected")
    for lam in ("fast", -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            LatencyPenalty(str(path), lam=lam)
    assert LatencyPenalty(str(path), lam="1e-3").lam == 1e-3  # YAML's reading of 1e-3
    with pytest.raises(FileNotFoundError):
        LatencyPenalty(str(tmp_path / "missing.pt"))
    big = tiny_space(nodes=3)
    with pytest.raises(ValueError, match="shape"):
        LatencyPenalty(str(path))({g: torch.zeros(e, o) for g, (e, o)
                                   in space_shapes(big).items()}, {})


def test_mnasnet_reward_hand_values():
    assert mnasnet_reward(0.8, 20.0, 10.0, -0.07) == pytest.approx(0.8 * 2 ** -0.07)
    assert mnasnet_reward(0.8, 5.0, 10.0, -0.07) == pytest.approx(0.8 * 0.5 ** -0.07)
    # hard constraint: no bonus under the target, proportional penalty above it
    assert mnasnet_reward(0.8, 5.0, 10.0, (0.0, -1.0)) == pytest.approx(0.8)
    assert mnasnet_reward(0.8, 20.0, 10.0, (0.0, -1.0)) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        mnasnet_reward(0.8, 0.0, 10.0)


def test_sampled_genotypes_are_valid_and_varied():
    space = tiny_space()
    g = torch.Generator().manual_seed(0)
    genos = [sample_genotype(space, g) for _ in range(20)]
    for x in genos:
        space.validate(x)
    assert len({str(x) for x in genos}) > 15
    assert TINY_SHAPE.resolution == 8


def _nb201_predictor(tmp_path):
    """latency = 10 ms + 10 ms per nor_conv_3x3 edge (op index 3), exactly."""
    from diffnas.spaces.nb201 import NB201_OPS

    path = tmp_path / "nb201_pred.pt"
    cost_predictor(list(NB201_OPS), {"nor_conv_3x3": 10.0}).save(path)
    return path


def test_cell_latency_fn_matches_hand_values(tmp_path):
    from diffnas.hardware.penalty import cell_latency_fn

    lat = cell_latency_fn(str(_nb201_predictor(tmp_path)))
    assert lat((0, 0, 0, 0, 0, 0)) == pytest.approx(10.0)
    assert lat((3, 1, 3, 2, 4, 3)) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        lat((0, 0, 5, 0, 0, 0))


def test_reinforce_with_mnasnet_reward_avoids_slow_ops(tmp_path):
    """Constant accuracy: the plain reward teaches nothing, the latency-aware reward
    drives the policy away from the slow op."""
    import numpy as np

    reinforce = pytest.importorskip("diffnas.nasbench.strategies.reinforce")
    from diffnas.nasbench.oracle import QueryOracle

    def slow_ops(latency_predictor):
        cfg = reinforce.ReinforceConfig(latency_predictor=latency_predictor,
                                        latency_target_ms=10.0, latency_w=-1.0)
        oracle = QueryOracle(lambda cell: 50.0, budget=400)
        reinforce.Reinforce(cfg).search(oracle, np.random.default_rng(0))
        return [sum(op == 3 for op in cell) for cell, _ in oracle.history[-100:]]

    plain = slow_ops(None)
    aware = slow_ops(str(_nb201_predictor(tmp_path)))
    assert sum(aware) / len(aware) < 0.5 * sum(plain) / len(plain)


def test_latency_aware_reinforce_reports_its_best_reward_not_its_most_accurate(tmp_path):
    """The runner reported the most accurate queried cell whatever the reward searched:
    with a latency reward its picks were several times over the target. Now the pick is
    the best queried cell by the reward, its predicted latency recorded and summarised."""
    import numpy as np

    from diffnas.nasbench.oracle import QueryOracle
    from diffnas.nasbench.runner import SearchOutcome, summarize
    from diffnas.nasbench.strategies import create_query_strategy
    from diffnas.nasbench.strategies.reinforce import Reinforce, ReinforceConfig

    slow = 3  # nor_conv_3x3: 10 ms per edge in _nb201_predictor, the rest free
    fast, accurate = (0, 0, 0, 0, 0, 1), (slow,) * 6  # 10 ms (the base) vs 70 ms
    oracle = QueryOracle(lambda cell: 90.0 if cell == accurate else 80.0, budget=5)
    for cell in (fast, accurate):
        oracle.query(cell)
    plain = Reinforce(ReinforceConfig())
    assert plain.choose(oracle) == (accurate, 90.0) and plain.describe_choice(accurate) == {}
    aware = create_query_strategy("reinforce", {  # as --set gives them
        "latency_predictor": str(_nb201_predictor(tmp_path)), "latency_target_ms": 10.0,
        "latency_w": [0, -1]})
    assert aware.config.latency_w == (0.0, -1.0)  # MnasNet's hard constraint, as docs say
    assert aware.choose(oracle) == (fast, 80.0)
    assert aware.describe_choice(fast) == {"predicted_latency_ms": pytest.approx(10.0)}
    row = SearchOutcome("reinforce", 0, 5, 2, "a", 0, 80.0, {"c10_test_200": 1.0}, 0.1,
                        extras=aware.describe_choice(fast)).to_dict()
    report = summarize([row, {**row, "seed": 1}])
    assert report["summary"][0]["predicted_latency_ms"]["mean"] == pytest.approx(10.0)
    assert "by its latency-aware reward (not by accuracy alone); predicted latency" in \
        report["paired_lines"][0]
    assert np.isclose(aware.reward(fast, 80.0), 0.8)


def test_thread_clock_is_used_and_validated(monkeypatch):
    import diffnas.hardware.latency as L

    ticks = iter(range(10_000))
    monkeypatch.setitem(L.CLOCKS, "thread", lambda: 0.002 * next(ticks))
    stats = measure_latency(_Probe(), (3,), LatencySettings(warmup=1, repeats=5,
                                                            clock="thread"))
    assert stats.median_ms == pytest.approx(2.0) and stats.samples_ms == pytest.approx([2.0] * 5)
    with pytest.raises(ValueError, match="threads=1"):
        LatencySettings(clock="thread", threads=2)
    with pytest.raises(ValueError, match="clock"):
        LatencySettings(clock="cpu")


def test_cli_fit_writes_a_predictor_and_report(tmp_path, capsys):
    from diffnas.cli import main

    space = tiny_space()
    data = tmp_path / "lat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _synthetic_records(space, 60)))
    out = tmp_path / "pred.pt"
    tiny = "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}"
    assert main(["latency", "fit", "--data", str(data), "--out", str(out), "--target", "raw",
                 "--epochs", "50", tiny]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["records"] == 60 and report["heldout"] == 12
    assert LatencyPredictor.load(out).shapes == space_shapes(space)
    # a dataset of another space is a clear error, not a crash
    assert main(["latency", "fit", "--data", str(data), "--out", str(out)]) == 2
    assert "does not fit space" in capsys.readouterr().err
    # refitted, the report diffnas wrote is replaced; a user's own X.json beside is not
    assert main(["latency", "fit", "--data", str(data), "--out", str(out), "--target", "raw",
                 "--epochs", "5", tiny]) == 0
    mine = tmp_path / "mine.json"
    mine.write_text('{"notes": 1}')
    capsys.readouterr()
    assert main(["latency", "fit", "--data", str(data), "--out", str(tmp_path / "mine.pt"),
                 "--epochs", "5", tiny]) == 2
    assert "not a report diffnas wrote" in capsys.readouterr().err
    assert mine.read_text() == '{"notes": 1}' and not (tmp_path / "mine.pt").exists()
    # --out never replaces the measured records, nor a file that is not a predictor
    measured = data.read_bytes()
    assert main(["latency", "fit", "--data", str(data), "--out", str(data), tiny]) == 2
    assert "is the --data file" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("my notes")
    assert main(["latency", "fit", "--data", str(data), "--out", str(tmp_path / "notes.pt"),
                 "--epochs", "5", tiny]) == 2
    assert "other than a latency predictor" in capsys.readouterr().err
    assert data.read_bytes() == measured
    assert (tmp_path / "notes.pt").read_text() == "my notes"
    assert main(["latency", "sweep", "--lambdas", "1,abc", "--predictor", str(out),
                 "--config", "c.yaml", "--out", str(tmp_path / "sw")]) == 2
    assert "--lambdas '1,abc': give numbers" in capsys.readouterr().err


def test_sweep_config_gets_exactly_one_latency_penalty(monkeypatch):
    from diffnas.config import load_config
    from diffnas.hardware.sweep import _with_penalty
    from diffnas.strategies.base import PENALTIES

    # another (registered: a config naming an unknown penalty is refused) penalty
    monkeypatch.setitem(PENALTIES._items, "other", lambda x: (lambda aw, logits: 0.0))
    base = load_config(None, ["search.strategy.penalties=[{name: other, x: 1}]"])
    cfg = _with_penalty(_with_penalty(base, 2.0, "p.pt"), 3.0, "p.pt")
    assert cfg.search.strategy["penalties"] == [
        {"name": "other", "x": 1}, {"name": "latency", "predictor": "p.pt", "lam": 3.0}]
    assert _with_penalty(base, 0.0, "p.pt").search.strategy["penalties"] == [
        {"name": "other", "x": 1}]
    assert base.search.strategy["penalties"] == [{"name": "other", "x": 1}]  # not mutated
    # the config's own latency settings are kept: only lam and the predictor change
    own = load_config(None, ["search.strategy.penalties=[{name: latency, predictor: a.pt, "
                             "lam: 1, input: probs, normalize: false}]"])
    assert _with_penalty(own, 2.0, "p.pt").search.strategy["penalties"] == [
        {"name": "latency", "predictor": "p.pt", "lam": 2.0, "input": "probs",
         "normalize": False}]


def test_snas_resource_constraint_uses_the_predictor(tmp_path):
    """SNAS (single level, Gumbel samples) with the latency penalty on softmax(alpha):
    the alpha gradient gains exactly the gradient of lam * E-latency / ref."""
    space = tiny_space()
    path, pred = _predictor_file(tmp_path, space)
    lam = 2.0
    section = {"name": "snas"}
    pen = {"name": "latency", "predictor": str(path), "lam": lam, "input": "probs"}
    batch = tiny_batch(4, 1)
    grads = []
    for sec in (section, {**section, "penalties": [pen]}):
        s = tiny_strategy(sec, space)
        torch.manual_seed(5)  # the same Gumbel sample in both runs
        stats = s.step(batch, None)
        grads.append([a.grad.clone() for a in s.alphas()])
    assert "penalty_latency" in stats
    logits = {g: a.detach().clone().requires_grad_(True)
              for g, a in tiny_strategy(section, space).arch_params.as_dict().items()}
    ref = lam * pred({g: torch.softmax(a, -1) for g, a in logits.items()}) / pred.ref_ms
    expected = torch.autograd.grad(ref, list(logits.values()))
    for a, b, e in zip(grads[0], grads[1], expected, strict=True):
        assert e.abs().max() > 1e-4
        assert torch.allclose(b - a, e, atol=1e-5)


def test_cli_measure_and_report(tmp_path, capsys):
    from diffnas.cli import main

    tiny = ["search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
            "retrain.network={C: 4, layers: 3}", "data.resolution=8"]
    out = tmp_path / "lat.jsonl"
    timing = ["--repeats", "2", "--warmup", "0", "--clock", "thread"]
    assert main(["latency", "measure", "--out", str(out), "-n", "3", "--chunk", "2", *timing,
                 *tiny]) == 0
    records = load_records(out)
    assert len(records) == 3
    assert records[0]["settings"]["clock"] == "thread"
    assert records[0]["settings"]["input_shape"] == [1, 8, 8]
    # as built: what the config leaves unset comes from its search.space section
    assert records[0]["settings"]["network"] == {"C": 4, "layers": 3, "auxiliary": False,
                                                 "stem_multiplier": 1, "channels_last": True}
    from diffnas.genotype import Genotype

    gfile = tmp_path / "g.json"
    Genotype.from_dict(records[0]["genotype"]).save(gfile)
    capsys.readouterr()
    assert main(["latency", "report", "--genotype", str(gfile), *timing, *tiny]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    assert report["params"] == records[0]["params"] and report["macs"] == records[0]["macs"]
    assert report["flops"] == 2 * report["macs"] == sum(report["flops_by_op"].values())


def test_nb201_config_measures_and_reports_latency(tmp_path, capsys):
    """The documented nb201 commands: the config's retrain.network is an nb201 one (the
    DARTS default {C: 36, layers: 20} is not), and costs are split by nb201 op."""
    from pathlib import Path

    from diffnas.cli import main
    from diffnas.spaces.nb201 import ops_to_genotype

    config = str(Path(__file__).resolve().parents[1] / "configs/darts_nb201_fashion_mnist.yaml")
    out = tmp_path / "lat.jsonl"
    timing = ["--repeats", "1", "--warmup", "0", "--clock", "thread"]
    assert main(["latency", "measure", "--config", config, "--out", str(out), "-n", "2",
                 *timing, "data.resolution=8"]) == 0
    assert load_records(out)[0]["settings"]["network"] == {"C": 16, "N": 5, "auxiliary": False,
                                                        "channels_last": True}
    gfile = tmp_path / "g.json"
    ops_to_genotype(("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "none",
                     "avg_pool_3x3", "nor_conv_3x3")).save(gfile)
    capsys.readouterr()
    assert main(["latency", "report", "--config", config, "--genotype", str(gfile), *timing,
                 "data.resolution=8"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("\n{") + 1:])  # after the printed genotype
    assert report["flops_by_op"]["nor_conv_3x3"] > report["flops_by_op"]["nor_conv_1x1"] > 0
    assert sum(report["flops_by_op"].values()) == report["flops"]


def test_a_torn_last_record_is_dropped_and_the_next_measurement_appends_cleanly(tmp_path):
    space = tiny_space()
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=2)
    build_dataset(space, path, 2, (1, 8, 8), {}, s, chunk=2)
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])  # a kill while appending a record
    assert len(load_records(path)) == 2
    build_dataset(space, path, 1, (1, 8, 8), {}, s, chunk=1)
    assert len(load_records(path)) == 3 and path.read_text().endswith("\n")
    path.write_text(path.read_text().rstrip("\n"))  # a whole last record, its newline lost
    build_dataset(space, path, 1, (1, 8, 8), {}, s, chunk=1)
    assert len(load_records(path)) == 4  # kept: not mistaken for a torn one
    path.write_text("{oops\n" + path.read_text())  # a bad line elsewhere is still an error
    with pytest.raises(ValueError, match=r"lat.jsonl:1: not a JSON record"):
        load_records(path)


def test_fit_keeps_repeated_measurements_of_one_network_on_one_side():
    """Merged files can hold one architecture twice: both copies train or both are held
    out, or the held-out error flatters the predictor. Without repeats the split is the
    one of a plain permutation of the records."""
    from diffnas.genotype import Genotype
    from diffnas.hardware.dataset import genotype_key
    from diffnas.hardware.predictor import split_by_architecture

    space = tiny_space()
    records = _synthetic_records(space, 40)
    train, test = split_by_architecture(records, 0.2, seed=3)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(test, perm[:8]) and torch.equal(train, perm[8:])
    merged = records + [dict(r) for r in records[:15]]  # 15 networks measured twice
    train, test = split_by_architecture(merged, 0.2, seed=3)
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(55))
    key = [genotype_key(Genotype.from_dict(r["genotype"])) for r in merged]
    assert not {key[i] for i in train.tolist()} & {key[i] for i in test.tolist()}
    assert len({key[i] for i in test.tolist()}) == 8  # 20% of the 40 architectures


def test_cli_refuses_settings_that_would_measure_nothing_or_overwrite(tmp_path, capsys):
    from diffnas.cli import main

    tiny = "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}"
    for flag in ("--count", "--chunk"):
        assert main(["latency", "measure", "--out", str(tmp_path / "l.jsonl"), flag, "0",
                     tiny]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "l.jsonl").exists()
    assert main(["latency", "fit", "--data", str(tmp_path / "l.jsonl"), "--out",
                 str(tmp_path / "p.json"), tiny]) == 2
    assert "name the predictor .pt" in capsys.readouterr().err
    assert main(["latency", "fit", "--data", str(tmp_path / "l.jsonl"), "--out",
                 str(tmp_path / "p.pt"), "--epochs", "0", tiny]) == 2
    assert "--epochs 0: the predictor needs at least 1 epoch" in capsys.readouterr().err
    assert not (tmp_path / "p.pt").exists()


def _stub_sweep_inputs(monkeypatch, meta: dict | None = None) -> None:
    """The sweep's data and predictor replaced by stand-ins: only its run bookkeeping runs.
    ``meta``: the stand-in predictor's fit report (default: none recorded)."""
    from diffnas.hardware import sweep

    monkeypatch.setattr(sweep, "load_search_data", lambda cfg: None)
    monkeypatch.setattr(sweep, "load_dataset", lambda *a, **k: type(
        "D", (), {"in_channels": 1, "resolution": 8, "num_classes": 10})())
    monkeypatch.setattr(sweep.LatencyPredictor, "load", staticmethod(
        lambda path: type("P", (), {"check_space": lambda self, s: None,
                                    "meta": meta or {}})()))


def test_sweep_refuses_bad_lambdas_and_runs_made_with_other_settings(tmp_path, monkeypatch):
    from diffnas.config import load_config, save_config
    from diffnas.hardware import sweep

    for lams, match in (([-1.0], "finite and >= 0"), ([1.0, 1], "a value is repeated"),
                        ([], "names no value")):
        with pytest.raises(ValueError, match=match):
            sweep.run_sweep(None, [], "p.pt", lams, tmp_path / "s")
    _stub_sweep_inputs(monkeypatch)
    old = tmp_path / "s/lam0.5"
    old.mkdir(parents=True)
    save_config(sweep._with_penalty(load_config(None, ["search.epochs=1"]), 0.5, "p.pt"),
                old / "config.yaml")
    with pytest.raises(ValueError, match=r"holds a run made with other settings \(search\.epochs: "
                                         r"1 there, 50 now: its config\.yaml differs"):
        sweep.run_sweep(None, ["search.epochs=50"], "p.pt", [0.5], tmp_path / "s")
    assert load_config(old / "config.yaml").search.epochs == 1  # left as it was

    def reached(cfg, run_dir, resume=False, data=None):
        raise RuntimeError(f"search reached, resume={resume}")

    monkeypatch.setattr(sweep, "run_search", reached)  # the same settings pass the check
    with pytest.raises(RuntimeError, match="search reached, resume=True"):
        sweep.run_sweep(None, ["search.epochs=1"], "p.pt", [0.5], tmp_path / "s")


def test_sweep_with_a_missing_predictor_leaves_no_out_folder(tmp_path):
    """The predictor was loaded after --out was made: a typo in its path left an empty
    folder behind."""
    from diffnas.hardware import sweep

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        sweep.run_sweep(None, [], str(tmp_path / "nope.pt"), [0.0, 1.0], tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_sweep_reuse_ignores_how_a_run_executes_but_not_a_refitted_predictor(tmp_path,
                                                                             monkeypatch):
    """A rerun with the predictor named by another path, or with progress/device/logger
    changed, reuses the runs; a predictor file refitted in place does not. Conflicts are
    found before any lambda runs."""
    from diffnas.hardware import sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.pt").write_bytes(b"v1")
    searched = []

    def reached(cfg, run_dir, resume=False, data=None):
        searched.append(run_dir.name)
        raise RuntimeError("search reached")

    monkeypatch.setattr(sweep, "run_search", reached)
    _stub_sweep_inputs(monkeypatch)
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):  # a first sweep: lam1 is made, its search starts
        sweep.run_sweep(None, ["search.epochs=1"], "p.pt", [1.0], out)
    assert (out / "lam1" / sweep.PREDICTOR_DIGEST).is_file()
    for predictor, extra in ((str(tmp_path / "p.pt"), ["progress=false"]),
                             ("./p.pt", ["logger=tensorboard"])):
        with pytest.raises(RuntimeError, match="search reached"):
            sweep.run_sweep(None, ["search.epochs=1", *extra], predictor, [1.0], out)
    (tmp_path / "p.pt").write_bytes(b"v2")  # refitted in place
    searched.clear()
    with pytest.raises(ValueError, match="another version of the predictor file"):
        sweep.run_sweep(None, ["search.epochs=1"], "p.pt", [0.5, 1.0], out)
    assert searched == [] and not (out / "lam0.5").exists()  # checked before any work


def test_sweep_warns_before_searching_when_the_predictor_measured_otherwise(
        tmp_path, monkeypatch, caplog):
    """Its measured latencies would not be comparable with the predicted ones: said
    before hours of search, not only (if at all) in sweep.json."""
    from diffnas.hardware import sweep
    from diffnas.hardware.latency import settings_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.pt").write_bytes(b"v1")

    def reached(cfg, run_dir, resume=False, data=None):
        raise RuntimeError("search reached")

    monkeypatch.setattr(sweep, "run_search", reached)
    space = {"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2}
    fitted = {**settings_dict(LatencySettings()), "input_shape": [1, 8, 8],
              "network": {"C": 8, "layers": 3}, "space": space}
    _stub_sweep_inputs(monkeypatch, {"settings": fitted, "device": {"id": "cpu-other"}})
    overrides = ["search.epochs=1", f"search.space={json.dumps(space)}",
                 "retrain.network={C: 4, layers: 3}"]
    with caplog.at_level("WARNING", logger="diffnas"), pytest.raises(RuntimeError):
        sweep.run_sweep(None, overrides, "p.pt", [1.0], tmp_path / "s")
    said = caplog.text
    assert "fitted on records measured otherwise" in said
    assert "network.C: 8 vs 4" in said and "device: 'cpu-other'" in said


def test_records_of_one_architecture_say_so():
    space = tiny_space()
    rec = _synthetic_records(space, 1)[0]
    with pytest.raises(ValueError, match="measure one architecture only"):
        fit_predictor([rec] * 12, space, epochs=1, target="raw")


@pytest.mark.parametrize("target", ["raw", "anchored"])
def test_records_of_one_latency_are_refused_not_fitted_to_a_constant(target):
    """Equal training latencies (a clock too coarse for the networks) have std 0: the
    predictor would give every cell one latency, and the penalty no gradient."""
    space = tiny_space()
    records = [{**r, "latency_ms": 2.0, "anchor_ms": 1.0, "ratio": 2.0}
               for r in _synthetic_records(space, 12)]
    with pytest.raises(ValueError, match=rf"training records all take 2 ms \({target} "
                                         r"latency\): .* larger --batch-size"):
        fit_predictor(records, space, epochs=1, target=target)
    records[3]["latency_ms"], records[3]["ratio"] = 3.0, 3.0  # (held out or trained on)
    records[4]["latency_ms"], records[4]["ratio"] = 3.0, 3.0
    fit_predictor(records, space, epochs=1, target=target)


def test_measure_and_report_refuse_a_device_they_would_not_time_on(tmp_path, capsys,
                                                                    monkeypatch):
    from diffnas.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    tiny = "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}"
    assert main(["latency", "measure", "--out", str(tmp_path / "l.jsonl"), "-n", "1", tiny,
                 "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "device=cuda: latency measure and report time networks on the CPU" in err
    assert not (tmp_path / "l.jsonl").exists()


def test_latency_tools_name_the_spaces_they_time(tmp_path, capsys):
    """A recurrent or graph config is refused by its space (it used to end in 'unknown
    dataset ptb', about a dataset the image reader does not know)."""
    from pathlib import Path

    from diffnas.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    for config in ("darts_rnn_ptb.yaml", "gnn_cora.yaml"):
        assert main(["latency", "measure", "--out", str(tmp_path / "l.jsonl"), "-n", "1",
                     "--config", str(configs / config)]) == 2
        assert "the latency tools time image networks" in capsys.readouterr().err
    assert not (tmp_path / "l.jsonl").exists()


def test_macs_of_a_model_without_parameters():
    assert count_macs(nn.ReLU(), (3, 4, 4)) == 0


def test_networks_compare_as_built_so_a_layout_set_in_the_space_is_a_mismatch():
    """A record stores its network as built; one written before (raw overrides, the rest
    in its space section) still compares equal to it, and a layout changed through
    ``search.space`` (not ``retrain.network``) makes a predictor's records differ."""
    from diffnas.hardware.costs import predictor_mismatch
    from diffnas.hardware.dataset import settings_differences
    from diffnas.spaces import create_space

    section = {"name": "darts_cnn", "C": 4, "layers": 3, "channels_last": False}
    space = create_space(section)
    built = space.network_settings({"C": 8})
    assert built == {"C": 8, "layers": 3, "auxiliary": False, "stem_multiplier": 3,
                     "channels_last": False}
    assert space.build_network(sample_genotype(space, torch.Generator()), C=8).channels_last \
        is False
    old = {"batch_size": 1, "network": {"C": 8}, "space": section}
    new = {"batch_size": 1, "network": built, "space": section}
    assert settings_differences(old, new) == {}
    assert settings_differences(old, {**new, "network": {**built, "C": 4}}) == {
        "network.C": (8, 4)}
    # report on a space whose layout differs only in search.space.channels_last
    now = create_space({**section, "channels_last": True})
    meta = {"settings": old, "device": {"id": "cpu-x"}}
    same = predictor_mismatch(meta, {"id": "cpu-x"}, {
        "batch_size": 1, "network": space.network_settings({"C": 8})})
    assert same == ""
    differ = predictor_mismatch(meta, {"id": "cpu-x"}, {
        "batch_size": 1, "network": now.network_settings({"C": 8})})
    assert differ == "network.channels_last: False vs True"


@pytest.mark.parametrize("penalty, match", [
    ("{name: latency, predictor: MISSING}", "latency predictor not found"),
    ("{name: latency, predictor: PRED, lam: fast}", "lam must be a finite number"),
    ("{name: latency, predictor: PRED, input: expected}", "input must be"),
    ("{name: latency, predictor: PRED, lam: 1}", "the latency predictor expects (edges, ops)"),
], ids=["missing", "lam", "input", "other-space"])
def test_a_bad_latency_penalty_writes_no_run_directory(tmp_path, capsys, penalty, match):
    """The penalty was first built with the strategy, after the run directory existed, and
    a resume may not change ``penalties``: the directory could never continue."""
    from diffnas.cli import main

    space = tiny_space()
    pred, _ = _predictor_file(tmp_path, space)
    penalty = penalty.replace("MISSING", str(tmp_path / "nope.pt")).replace("PRED", str(pred))
    runs = tmp_path / "runs"
    args = ["search", "data.name=digits", "search.epochs=1", f"out_dir={runs}",
            "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
            f"search.strategy.penalties=[{penalty}]", "retrain.cutout=0"]
    if match.startswith("the latency predictor expects"):  # a space with more nodes
        args[4] = args[4].replace("nodes: 2", "nodes: 3")
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not runs.exists()


def test_a_refused_model_leaves_every_model_in_its_mode(monkeypatch):
    """measure_many put the models before a refused one in eval mode and left them so."""
    import diffnas.hardware.latency as L

    a, b = _Probe(), _Probe()
    monkeypatch.setattr(L, "_device_of", lambda m: torch.device("cuda" if m is b else "cpu"))
    with pytest.raises(ValueError, match="clock='thread' only measures CPU work"):
        L.measure_many([a, b], (3,), LatencySettings(warmup=0, repeats=1, clock="thread"))
    assert a.training and b.training


def test_measure_refuses_to_append_records_of_another_device(tmp_path):
    """The docs said measure refuses to mix devices in one file; it appended, and only fit
    caught the mix."""
    space = tiny_space()
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=2)
    build_dataset(space, path, 2, (1, 8, 8), {}, s, chunk=2)
    lines = path.read_text().splitlines()
    other = json.loads(lines[0])
    other["device"] = {**other["device"], "cpu": "Some Other CPU", "id": "0123456789ab"}
    path.write_text("\n".join([json.dumps(other), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"records measured on another device \(record 1 vs "
                                         r"this machine: cpu: 'Some Other CPU' vs "):
        build_dataset(space, path, 1, (1, 8, 8), {}, s)
    assert len(load_records(path)) == 2  # nothing appended


def test_fit_names_the_cause_when_the_holdout_takes_every_architecture():
    """holdout 0.99 of 12 architectures held all of them out, and the error said the
    records measured one architecture only."""
    space = tiny_space()
    with pytest.raises(ValueError, match="holdout 0.99 leaves 0 of 12 records to train on"):
        fit_predictor(_synthetic_records(space, 12), space, holdout=0.99, epochs=2)


def test_an_unknown_fingerprint_names_the_devices_the_file_holds(tmp_path):
    path = tmp_path / "lat.jsonl"
    records = _synthetic_records(tiny_space(), 3)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(load_records(path, "synthetic")) == 3
    with pytest.raises(ValueError, match=r"holds no record of device 'abc'; its devices: "
                                         r"synthetic \(3 records\)"):
        load_records(path, "abc")


def _sweep_cli(tmp_path, out, lambdas: str = "0,1") -> list[str]:
    """``diffnas latency sweep`` arguments for a tiny config and a (stand-in) predictor."""
    (tmp_path / "c.yaml").write_text("search: {epochs: 1}\n")
    (tmp_path / "p.pt").write_bytes(b"v1")
    return ["latency", "sweep", "--config", str(tmp_path / "c.yaml"), "--predictor",
            str(tmp_path / "p.pt"), "--lambdas", lambdas, "--out", str(out)]


def test_a_sweep_refuses_a_lambda_run_another_process_holds(tmp_path, monkeypatch, capsys):
    """The sweep searched without the run lock: a ``search --resume`` of one of its runs
    (or a second sweep into the same --out) computed in the same run, and its metrics held
    every epoch twice. Now it is refused before anything runs, naming the holder."""
    import subprocess
    import sys

    from diffnas.cli import main
    from diffnas.hardware import sweep

    searched = []
    monkeypatch.setattr(sweep, "run_search", lambda cfg, run_dir, **k: searched.append(run_dir))
    _stub_sweep_inputs(monkeypatch)
    out = tmp_path / "sw"
    (out / "lam1").mkdir(parents=True)
    code = ("import sys, time; from diffnas.engine.runlock import acquire_run_lock; "
            "acquire_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / "lam1")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_sweep_cli(tmp_path, out)) == 2
        err = capsys.readouterr().err
        assert f"{out / 'lam1'} is in use by another diffnas process (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert searched == []
    assert not (out / "lam0").exists()  # made by the refused sweep: removed again
    assert not (out / "lam1" / "config.yaml").exists()


def test_sweep_runs_are_locked_search_runs_with_a_log(tmp_path, monkeypatch):
    """Each lambda's directory is held with the run lock while the sweep runs (freed when
    it ends), is marked a search run (``made_by.txt``: ``--resume`` and report take it
    for one) and gets a ``log.txt`` with the sweep's progress and the engine's lines."""
    import logging

    from diffnas.engine.rundir import made_by
    from diffnas.hardware import sweep

    seen = {}

    def search(cfg, run_dir, resume=False, data=None):
        seen.update(locked=locked_elsewhere(run_dir), made_by=made_by(run_dir))
        logging.getLogger("diffnas").info("search epoch 1/1 loss=1.0 (stand-in)")
        raise RuntimeError("search reached")

    monkeypatch.setattr(sweep, "run_search", search)
    _stub_sweep_inputs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.pt").write_bytes(b"v1")
    out = tmp_path / "sw"
    with pytest.raises(RuntimeError, match="search reached"):
        sweep.run_sweep(None, ["search.epochs=1"], "p.pt", [1.0], out)
    assert seen == {"locked": True, "made_by": "search"}
    run = out / "lam1"
    assert not locked_elsewhere(run)  # freed as the sweep ended
    log_text = (run / "log.txt").read_text()
    assert f"lambda 1 (1/1): search in {run}" in log_text
    assert "search epoch 1/1 loss=1.0 (stand-in)" in log_text


@pytest.mark.run_plots
def test_a_tiny_sweep_logs_its_epochs_into_each_run(tmp_path, capsys):
    """A real (tiny) sweep: every lambda's run holds config, made_by.txt ("search") and a
    log.txt with its search and retraining epochs, its plots as an ordinary run does, and
    is free once the sweep returns."""
    from diffnas.cli import main
    from diffnas.engine.rundir import made_by

    pred, _ = _predictor_file(tmp_path, tiny_space())
    out = tmp_path / "sw"
    (tmp_path / "c.yaml").write_text("data: {name: digits, train_subset: 32, test_subset: 16, "
                                     "batch_size: 16}\n")
    assert main(["latency", "sweep", "--config", str(tmp_path / "c.yaml"), "--predictor",
                 str(pred), "--lambdas", "0,1", "--out", str(out), "--repeats", "2",
                 "--warmup", "0", "--clock", "thread", "search.epochs=1", "progress=false",
                 "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, "
                 "stem_multiplier: 1}", "retrain.epochs=1", "retrain.batch_size=16",
                 "retrain.train_subset=32", "retrain.network={C: 4, layers: 2}",
                 "retrain.auxiliary_weight=0", "retrain.cutout=0"]) == 0
    for lam in ("0", "1"):
        run = out / f"lam{lam}"
        assert made_by(run) == "search" and not locked_elsewhere(run)
        text = (run / "log.txt").read_text()
        assert f"lambda {lam} (" in text and "search epoch 1/1" in text
        assert "retrain epoch 1/1" in text
        assert (run / "plots" / "cell_normal.svg").is_file() and "plots: " in text
    assert "lambda 0 (1/2)" not in (out / "lam1" / "log.txt").read_text()
    assert json.loads((out / "sweep.json").read_text())["rows"][1]["lambda"] == 1


def test_an_interrupted_sweep_or_measure_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Ctrl-C printed only ``diffnas: interrupted``, though running the same command
    again continues (the sweep reuses finished lambdas; measure appends)."""
    from diffnas.cli import main
    from diffnas.hardware import dataset, sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(_sweep_cli(tmp_path, tmp_path / "sw")) == 130
    err = capsys.readouterr().err
    assert "diffnas: interrupted; run the same command again to continue the sweep" in err

    def two_chunks(space, path, count, *args, progress=None, **kwargs):
        progress(5, count)
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "build_dataset", two_chunks)
    lat = tmp_path / "lat.jsonl"
    tiny = "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}"
    assert main(["latency", "measure", "--out", str(lat), "-n", "12", tiny]) == 130
    err = capsys.readouterr().err
    assert (f"5 of 12 new records were appended to {lat} and are kept; run the same "
            "command again with -n 7 to measure the rest") in err


def test_threads_left_as_they_are_record_the_count_in_use():
    """--threads 0 leaves torch's thread count alone: the fingerprint records that count,
    so files measured under other OMP_NUM_THREADS do not pass as compatible."""
    from diffnas.hardware.latency import device_fingerprint

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_fingerprint("cpu", 0)
        torch.set_num_threads(2)
        two = device_fingerprint("cpu", 0)
    finally:
        torch.set_num_threads(before)
    assert one["threads"] == 1 and two["threads"] == 2 and one["id"] != two["id"]
    assert device_fingerprint("cpu", 3)["threads"] == 3
