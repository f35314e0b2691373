"""RLNAS: labels permuted once and fixed, single-path sampling, the angle metric."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_SHAPE, tiny_batch, tiny_strategy
from test_family_smoke import nb201_space

from diffnas.config import load_config
from diffnas.data.base import ImageData
from diffnas.engine.search import build_search
from diffnas.strategies.random_labels import angle_from_sums

SEC = {"name": "random_labels", "population": 6, "iterations": 3, "parents": 2,
       "w_optim": {"weight_decay": 0.0, "momentum": 0.0}}


def test_labels_are_a_permutation_fixed_over_the_run():
    g = torch.Generator().manual_seed(0)
    n = 64
    data = ImageData("fake", torch.randn(n, 1, 8, 8, generator=g),
                     torch.randint(0, 3, (n,), generator=g), torch.randn(8, 1, 8, 8),
                     torch.zeros(8, dtype=torch.long), TINY_SHAPE.num_classes)
    cfg = load_config(None, [
        "data.batch_size=16", "progress=false", "search.epochs=2",
        "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
        "search.strategy={name: random_labels}"])
    task = build_search(cfg, data)
    assert task.val is None  # one stream, no validation split
    key = lambda x: x.flatten().tolist()  # noqa: E731
    seen: dict[tuple, int] = {}
    for epoch in range(3):
        for (x, y), _ in task.batches(epoch):
            for xi, yi in zip(x, y, strict=True):
                k = tuple(key(xi))
                assert seen.setdefault(k, int(yi)) == int(yi)  # same label every epoch
    assert len(seen) == 64
    # the loader serves the permuted labels, not the original ones
    original = {tuple(key(xi)): int(yi) for xi, yi in zip(data.train_x, data.train_y, strict=True)}
    assert sum(original[k] != v for k, v in seen.items()) > 10
    perm = task.strategy.relabel(data.train_y)
    assert sorted(perm.tolist()) == sorted(data.train_y.tolist())  # a permutation
    assert not torch.equal(perm, data.train_y)
    assert torch.equal(perm, task.strategy.relabel(data.train_y))  # fixed


def test_untrained_path_has_angle_zero_and_trained_paths_do_not():
    s = tiny_strategy(SEC)
    x, _ = tiny_batch(4, 0)
    s.map_edges(x[:2])
    for _ in range(5):
        assert s.angle(s.sample_path()) == 0.0  # nothing trained yet
    torch.manual_seed(0)
    paths = []
    orig = s.sample_path
    s.sample_path = lambda: paths.append(orig()) or paths[-1]
    for i in range(3):
        s.step(tiny_batch(4, i), None)
    s.sample_path = orig
    assert all(s.angle(p) > 0 for p in paths)
    # a path made of ops that were never sampled: its own weights have not moved
    unused = {}
    for g, c in s.counts.items():
        unused[g] = torch.tensor([next(int(j) for j in s.allowed[g] if c[r, j] == 0)
                                  for r in range(c.shape[0])])
    assert s.angle(unused, include_shared=False) == 0.0
    assert s.angle(paths[0], include_shared=False) > 0


def test_a_pooling_path_counts_its_fixed_kernel_and_ranks_below_a_skip_path():
    """RLNAS's code: pooling enters both vectors as a fixed C x k x k kernel of 1/k^2,
    which pulls the angle down; a skip connection has no weights."""
    s = tiny_strategy(SEC, space=nb201_space())
    s.map_edges(tiny_batch(4, 0)[0][:2])
    for i in range(4):
        s.step(tiny_batch(4, i), None)
    (g,) = s.allowed
    names = s.arch_params.candidates(g)
    n = len(s.arch_params.edges[g])
    path = {op: {g: torch.full((n,), names.index(op))} for op in ("avg_pool_3x3", "skip_connect")}
    shared = angle_from_sums(*s._sums()[("", -1, -1)])
    assert shared > 0
    assert s.angle(path["skip_connect"]) == shared  # no weights on the path
    # the pools' kernels: squared norm C / 9 each, in the dot product and both norms; the
    # three cells (C = 4, 8, 16) share the group's alphas, so an edge's op is in all three
    assert s._sums()[(g, 0, names.index("avg_pool_3x3"))] == pytest.approx((28 / 9,) * 3)
    assert 0 < s.angle(path["avg_pool_3x3"]) < shared


@pytest.mark.parametrize("setting, key", [
    ("relaxation: {name: hard_gumbel}", "relaxation"),
    ("edge_norm: true", "edge_norm"),
    ("a_optim: {lr: 1.0}", "a_optim"),
])
def test_architecture_settings_it_would_ignore_are_refused(setting, key):
    from diffnas.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=rf"no use for search\.strategy\.{key}"):
        load_config(None, [f"search.strategy={{name: random_labels, {setting}}}"])
    load_config(None, ["search.strategy={name: random_labels, a_optim: {betas: [0.5, 0.999]}}"])


def test_angle_formula():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    got = angle_from_sums(float(a @ b), float(a @ a), float(b @ b))
    assert math.isclose(got, math.pi / 4)
    w = torch.randn(1000, dtype=torch.float64)
    assert angle_from_sums(float(w @ w), float(w @ w), float(w @ w)) == 0.0


def test_single_path_computes_one_op_per_edge_and_alphas_stay():
    s = tiny_strategy(SEC, space=nb201_space())
    a0 = [p.detach().clone() for p in s.alphas()]
    s.map_edges(tiny_batch(2, 0)[0])  # the one traced forward, done before counting
    calls = []
    for m in s.supernet.modules():
        if hasattr(m, "candidates") and isinstance(getattr(m, "ops", None), torch.nn.ModuleList):
            for op in m.ops:
                op.register_forward_hook(lambda *a: calls.append(1))
    n_edges = sum(1 for m in s.supernet.modules() if hasattr(m, "candidates"))
    s.step(tiny_batch(4, 1), None)
    assert len(calls) == n_edges
    assert all(torch.equal(p, q) for p, q in zip(s.alphas(), a0, strict=True))


def test_evolution_exports_its_best_path():
    s = tiny_strategy({**SEC, "exclude_ops": ["none", "nor_conv_1x1"]}, space=nb201_space())
    torch.manual_seed(0)
    for i in range(3):
        s.step(tiny_batch(4, i), None)
    s.end_epoch()
    best, angle = s.best_path, s.best_angle
    assert angle == s.angle(best) > 0
    chosen = s.arch_params["cell"].argmax(-1)
    assert torch.equal(chosen, best["cell"])
    # the export reflects the angle ranking: the best path beats a path of convolutions
    # that were never sampled (their weights did not move, which pulls the angle down)
    untouched = {"cell": torch.full((6,), s.arch_params.candidates("cell").index("nor_conv_1x1"))}
    assert angle > s.angle(untouched)


def test_graph_space_search_maps_every_edge_and_exports_its_best_path(tmp_path):
    """RLNAS works on the gnn space too: its mixed ops take the weight row at another
    argument position and its input is one whole graph (not a batch to slice)."""
    from test_graph_space import tiny_cfg

    from diffnas.data.graph import load_graph
    from diffnas.engine.graph import build_graph_search
    from diffnas.supernet.gnn import CELL

    cfg = tiny_cfg(tmp_path, "search.strategy={name: random_labels, population: 6, "
                             "iterations: 2, parents: 2}")
    task = build_graph_search(cfg, load_graph("karate"))
    s = task.strategy
    torch.manual_seed(0)
    for epoch in range(2):
        for batch in task.batches(epoch):
            assert math.isfinite(task.step(batch)["loss"])
        s.end_epoch()
    rows = len(s.arch_params.edges[CELL])
    mapped = {(g, r) for g, r, _ in s.edge_params if g}
    assert mapped == {(CELL, r) for r in range(rows)}  # every edge found by its weight row
    assert s.best_angle == s.angle(s.best_path) > 0
    assert torch.equal(s.arch_params[CELL].argmax(-1), s.best_path[CELL])


def test_graph_random_labels_are_drawn_from_the_training_nodes_only(tmp_path):
    """The search reads no validation or test label: the training nodes' random targets
    are a permutation of their own labels and do not move when other labels change."""
    import copy

    from test_graph_space import tiny_cfg

    from diffnas.data.graph import load_graph
    from diffnas.engine.graph import build_graph_search

    cfg = tiny_cfg(tmp_path, "search.strategy={name: random_labels}")
    data = load_graph("karate")
    tr = data.train_idx
    targets = build_graph_search(cfg, data).splits.train_y[tr]
    assert sorted(targets.tolist()) == sorted(data.y[tr].tolist())
    assert not torch.equal(targets, data.y[tr])  # permuted
    other = copy.deepcopy(data)
    rest = torch.cat([other.val_idx, other.test_idx])
    other.y[rest] = 1 - other.y[rest]  # karate has two classes
    assert torch.equal(build_graph_search(cfg, other).splits.train_y[tr], targets)


def test_a_misspelt_excluded_op_is_named():
    """exclude_ops: [nonee] used to exclude nothing, silently ('none' stayed sampleable)."""
    with pytest.raises(ValueError, match=r"exclude_ops \['nonee'\] are not ops of this space"):
        tiny_strategy({**SEC, "exclude_ops": ["nonee"]}, space=nb201_space())


def test_sampling_none_is_refused_where_the_discretizer_drops_it():
    """Under the darts rule a path with 'none' on most of a node's edges would be turned
    into a genotype with inputs (and ops) the path never trained: refused before the run.
    NAS-Bench-201 (argmax: 'none' is a kept op) may sample it."""
    from diffnas.config import ConfigError

    with pytest.raises(ConfigError, match=r"exclude_ops \[\] lets paths sample 'none'"):
        load_config(None, ["search.strategy={name: random_labels, exclude_ops: []}"])
    with pytest.raises(ConfigError, match="exclude_ops"):
        load_config(None, ["search.strategy={name: random_labels, exclude_ops: []}",
                           "search.space={name: nb201}", "search.discretizer=darts",
                           "retrain.enabled=false"])
    cfg = load_config(None, ["search.strategy={name: random_labels, exclude_ops: []}",
                             "search.space={name: nb201}", "retrain.enabled=false"])
    assert cfg.search.strategy["exclude_ops"] == []


def test_the_label_permutation_is_drawn_from_label_seed():
    labels = torch.arange(50)
    perms = {seed: tiny_strategy({**SEC, "label_seed": seed}).relabel(labels)
             for seed in (0, 1)}
    for seed, got in perms.items():
        want = labels[torch.randperm(50, generator=torch.Generator().manual_seed(seed))]
        assert torch.equal(got, want)
    assert not torch.equal(perms[0], perms[1])


def test_sampled_paths_avoid_the_excluded_ops():
    s = tiny_strategy({**SEC, "exclude_ops": ["none", "nor_conv_3x3"]}, space=nb201_space())
    names = s.arch_params.candidates("cell")
    torch.manual_seed(0)
    seen = torch.zeros(len(names), dtype=torch.long)
    for _ in range(200):
        seen += torch.bincount(s.sample_path()["cell"], minlength=len(names))
    for i, n in enumerate(names):
        assert (seen[i] == 0) == (n in ("none", "nor_conv_3x3")), (n, seen)


def _evolution(settings, monkeypatch):
    """A strategy whose angle is a made-up fitness: how many edges match a target path."""
    s = tiny_strategy({**SEC, **settings}, space=nb201_space())
    target = torch.tensor([1, 2, 3, 4, 1, 2])
    fitness = lambda p, include_shared=True, sums=None: float((p["cell"] == target).sum())  # noqa: E731
    monkeypatch.setattr(s, "_sums", lambda: {})
    monkeypatch.setattr(s, "angle", fitness)
    return s, fitness


def test_evolution_keeps_the_fittest_path_and_improves_on_its_population(monkeypatch):
    s, fitness = _evolution({"population": 6, "iterations": 0}, monkeypatch)
    torch.manual_seed(0)
    population = [s.sample_path() for _ in range(6)]
    torch.manual_seed(0)
    best, score = s.evolve()  # no iterations: the best of the first population
    assert score == fitness(best) == max(fitness(p) for p in population)
    s, fitness = _evolution({"population": 8, "iterations": 25, "parents": 3}, monkeypatch)
    torch.manual_seed(0)
    start = max(fitness(s.sample_path()) for _ in range(8))
    torch.manual_seed(0)
    best, score = s.evolve()
    assert score == fitness(best) == 6 > start  # the target path itself


def test_mutation_flips_edges_with_its_probability():
    for prob, low, high in ((0.0, 0, 0), (1.0, 0.6, 0.9)):  # new op = old op 1 time in 4
        s = tiny_strategy({**SEC, "mutate_prob": prob}, space=nb201_space())
        torch.manual_seed(0)
        changed = []
        for _ in range(100):
            p = s.sample_path()
            changed.append(float((s._mutate(p)["cell"] != p["cell"]).float().mean()))
        assert low <= sum(changed) / len(changed) <= high


def test_the_export_writes_5_plus_each_op_s_own_angle():
    s = tiny_strategy(SEC, space=nb201_space())
    torch.manual_seed(0)
    for i in range(3):
        s.step(tiny_batch(4, i), None)
    path = s.sample_path()
    s.export(path)
    sums = s._sums()
    logits = s.arch_params["cell"].detach()
    for r, op in enumerate(path["cell"].tolist()):
        own = angle_from_sums(*sums.get(("cell", r, op), (0.0, 0.0, 0.0)))
        assert logits[r, op].item() == pytest.approx(5.0 + own)
        assert float(logits[r].sum()) == pytest.approx(5.0 + own)  # the others are 0
    assert any(logits[r, op] > 5.0 for r, op in enumerate(path["cell"].tolist()))
