"""Collapse diagnostics: skip_connect count per epoch and the alpha-Hessian eigenvalue."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy

from diffnas.engine.diagnostics import (
    CollapseDiagnostics,
    alpha_hessian_eigenvalue,
    dominant_eigenvalue,
    largest_eigenvalue,
    skip_count,
)
from diffnas.engine.loop import Loop
from diffnas.engine.search import SearchTask
from diffnas.ops import twice_differentiable

F64 = torch.float64


def test_power_iteration_matches_the_explicit_spectrum():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    H = q @ torch.diag(torch.tensor([-0.5, 0.2, 1.0, 2.0, 4.0], dtype=F64)) @ q.T
    x = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    loss = 0.5 * x @ H @ x + (x ** 3).sum() * 0  # the Hessian is H
    assert abs(dominant_eigenvalue(loss, [x], iters=200, tol=1e-12) - 4.0) < 1e-6


@pytest.mark.parametrize("spectrum", [
    [3.0, -3.0, 0.5, 0.1],    # +-a: the quotient stops changing at once, on a wrong value
    [3.0, -2.9, 0.5, 0.1],
    [1.0, -4.0, 0.5, 0.2],    # the largest in magnitude is negative
    [-1.0, -4.0, -0.5, -0.2],  # all negative: the largest is -0.2
])
def test_largest_eigenvalue_of_indefinite_hessians(spectrum):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    H = q @ torch.diag(torch.tensor(spectrum, dtype=F64)) @ q.T
    x = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    got = largest_eigenvalue(0.5 * x @ H @ x, [x], iters=20)  # the default
    assert abs(got - max(spectrum)) < 1e-6


def test_largest_eigenvalue_small_next_to_a_large_negative_one_at_default_iters():
    """224 alphas (the DARTS cell pair), top 0.5, bottom -3, the rest in [0, 0.15]: a
    shifted power iteration was 37-86% low after 20 steps."""
    g = torch.Generator().manual_seed(2)
    n = 224
    spectrum = torch.cat([torch.tensor([0.5, -3.0], dtype=F64),
                          0.15 * torch.rand(n - 2, generator=g, dtype=F64)])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    H = q @ torch.diag(spectrum) @ q.T
    x = torch.randn(n, generator=g, dtype=F64, requires_grad=True)
    assert abs(largest_eigenvalue(0.5 * x @ H @ x, [x]) - 0.5) < 1e-3


def test_alpha_hessian_eigenvalue_on_the_supernet():
    space = tiny_space(ops=["skip_connect", "avg_pool_3x3", "sep_conv_3x3"])
    s = tiny_strategy({"name": "darts"}, space=space, dtype=F64)
    batch = tiny_batch(4, 2, F64)
    flat = torch.cat([p.detach().flatten() for p in s.alphas()]).requires_grad_(True)
    shapes = [p.shape for p in s.alphas()]

    def loss_of(v):
        parts, i = {}, 0
        for g, shp in zip(s.arch_params.groups(), shapes, strict=True):
            parts[g] = v[i: i + shp.numel()].view(shp)
            i += shp.numel()
        return s.loss(batch, s.relaxation(parts))[0]

    with twice_differentiable():  # the reference Hessian needs double backward
        H = torch.autograd.functional.hessian(loss_of, flat)
    eig = torch.linalg.eigvalsh(H)
    ref = float(eig.max())  # RobustDARTS's max(eig(H)), not the largest in magnitude
    got = alpha_hessian_eigenvalue(s, batch)  # the default 20 iterations
    assert abs(got - ref) < 1e-3 * abs(ref)
    rng = torch.get_rng_state()
    buffers = {n: b.clone() for n, b in s.supernet.named_buffers()}
    alpha_hessian_eigenvalue(s, batch, iters=3)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone
    for n, b in s.supernet.named_buffers():  # and so are BN's running statistics
        assert torch.equal(b, buffers[n]), n


def test_skip_count_is_written_per_epoch(tmp_path):
    space = tiny_space()
    s = tiny_strategy({"name": "darts", "a_optim": {"lr": 0.0, "weight_decay": 0.0}},
                      space=space)
    ops = s.arch_params.candidates("normal")
    with torch.no_grad():  # normal cell: skip_connect wins on exactly 3 of the 5 edges
        s.arch_params["normal"].zero_()
        s.arch_params["normal"][[0, 2, 4], ops.index("skip_connect")] = 5.0
        s.arch_params["normal"][[1, 3], ops.index("sep_conv_3x3")] = 4.0

    class Batches:
        def __init__(self, b):
            self.b = b

        def set_epoch(self, e):
            pass

        def __iter__(self):
            return iter([self.b])

        def __len__(self):
            return 1

    task = SearchTask(s, space, Batches(tiny_batch(4, 1)), Batches(tiny_batch(4, 2)))
    path = tmp_path / "collapse.jsonl"
    diag = CollapseDiagnostics(path, hessian_batch=tiny_batch(4, 2), hessian_iters=5)
    Loop(task, 2, [diag]).run()
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    # node 2 keeps e0 (skip) and e1 (sep); node 3 keeps e0 (row 2, skip) and e2 (row 4,
    # skip) over e1 (row 3, sep, weaker): 3 skip_connect edges
    expected = 3
    assert skip_count(task.genotype(), "normal") == expected
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["skip_connect"] == expected for r in rows) and expected >= 2
    assert all(r["cell"] == "normal" and isinstance(r["hessian_eig"], float) for r in rows)


def test_skip_count_on_a_hand_made_genotype():
    from diffnas.genotype import CellGenotype, Edge, Genotype

    cell = CellGenotype("normal", (Edge("skip_connect", 0, 2), Edge("sep_conv_3x3", 1, 2),
                                   Edge("skip_connect", 1, 3), Edge("skip_connect", 2, 3)),
                        (2, 3))
    red = CellGenotype("reduce", (Edge("skip_connect", 0, 2),), (2,))
    g = Genotype("darts_cnn", (cell, red))
    assert skip_count(g) == 3 and skip_count(g, "reduce") == 1
