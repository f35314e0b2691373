"""Single-level DARTS and SNAS: one batch, one loss, both parameter sets step along its
gradient; SNAS's resource term pushes the architecture towards cheap ops."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_strategy

PLAIN = {"w_optim": {"momentum": 0.0, "weight_decay": 0.0, "grad_clip": 1e9, "lr": 0.1},
         "a_optim": {"weight_decay": 0.0, "lr": 0.01}}


@pytest.mark.parametrize("clip", [1e9, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("section", [
    {"name": "single_level"},
    {"name": "snas", "cost_weight": 0.5},
])
def test_one_batch_both_sets_move_along_the_same_loss(section, clip):
    """Both step along one loss's gradient; the weights' gradient clipped to
    w_optim.grad_clip (their own norm: the alphas' is Adam's business)."""
    plain = {**PLAIN, "w_optim": {**PLAIN["w_optim"], "grad_clip": clip}}
    s = tiny_strategy({**section, **plain})
    assert type(s).uses_validation is False
    batch = tiny_batch(4, 1)
    w0 = [p.detach().clone() for p in s.supernet.parameters()]
    a0 = [p.detach().clone() for p in s.alphas()]
    # reference: gradient of the one loss (same Gumbel draw: same RNG state)
    torch.manual_seed(3)
    aw = s.arch_weights()
    loss, _ = s.loss(batch, aw)
    extra, _ = s.extra_loss(aw)
    total = loss if extra is None else loss + extra
    grads = torch.autograd.grad(total, list(s.supernet.parameters()) + s.alphas(),
                                allow_unused=True)
    n = len(w0)
    g_w = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[:n], w0, strict=True)]
    g_a = grads[n:]
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in g_w)))
    c = min(1.0, clip / (norm + 1e-6))
    assert (c < 0.5) == (clip < 1)  # the clipped case does clip
    torch.manual_seed(3)
    stats = s.step(batch, None)
    if section["name"] == "snas":  # the resource term's figures are reported
        assert {"cost", "tau"} <= set(stats)
    for p, p0, g in zip(s.supernet.parameters(), w0, g_w, strict=True):
        assert torch.allclose(p.detach(), p0 - 0.1 * c * g, atol=1e-6)
    for p, p0, g in zip(s.alphas(), a0, g_a, strict=True):
        # Adam's first step: lr * g / (|g| + eps) (bias-corrected moments)
        assert torch.allclose(p.detach(), p0 - 0.01 * g / (g.abs() + 1e-8), atol=1e-5)
        assert (p.detach() - p0).abs().max() > 1e-3


def test_single_level_refuses_a_validation_batch():
    s = tiny_strategy({"name": "single_level"})
    with pytest.raises(ValueError, match="one stream"):
        s.step(tiny_batch(4, 1), tiny_batch(4, 2))


def test_snas_resource_term_favours_cheap_ops():
    """With a heavy cost weight, the logit of the costliest op falls relative to the
    parameter-free skip_connect; without it the difference stays small."""
    costed = tiny_strategy({"name": "snas", "cost_weight": 1.0})
    ops = costed.arch_params.candidates("normal")
    costly = max(range(len(ops)), key=lambda i: float(costed.costs["normal"][0, i]))
    skip = ops.index("skip_connect")

    def drift(cost_weight):
        s = tiny_strategy({"name": "snas", "cost_weight": cost_weight,
                           "a_optim": {"lr": 0.05, "weight_decay": 0.0}})
        a0 = s.arch_params["normal"].detach().clone()
        torch.manual_seed(0)
        for i in range(5):
            s.step(tiny_batch(4, i), None)
        d = s.arch_params["normal"].detach() - a0
        return float((d[:, costly] - d[:, skip]).mean())

    assert drift(50.0) < -0.1
    assert drift(50.0) < drift(0.0) - 0.1


def test_snas_costs_each_edge_at_its_stride():
    """The reduction cell's edges from its inputs downsample: their skip_connect is a
    FactorizedReduce with weights, so it costs what the supernet's op there holds."""
    s = tiny_strategy({"name": "snas"})
    ops = s.arch_params.candidates("reduce")
    skip, sep5 = ops.index("skip_connect"), ops.index("sep_conv_5x5")
    cells = [m for m in s.supernet.modules() if hasattr(m, "reduction")]
    for g, reduction in (("normal", False), ("reduce", True)):
        cell = next(c for c in cells if c.reduction == reduction)
        C = cell.edges[0].ops[sep5][0][1].in_channels  # the cell's width
        costs = tiny_strategy({"name": "snas", "cost_channels": C, "cost_weight": 1.0}).costs[g]
        for row, (e, mixed) in enumerate(zip(s.arch_params.edges[g], cell.edges, strict=True)):
            held = torch.tensor([float(sum(p.numel() for p in op.parameters()))
                                 for op in mixed.ops])
            assert torch.allclose(costs[row] / costs[row, sep5], held / held[sep5]), e.label
            assert (costs[row, skip] > 0) == (reduction and e.src < 2)


def test_snas_needs_gumbel():
    with pytest.raises(ValueError, match="Gumbel"):
        tiny_strategy({"name": "snas", "relaxation": {"name": "softmax"}})
