"""Second-pass rules of the DARTS convolutional supernet and retrain network, each
proved against a hand computation or a float64 replay:

- a hard-sampled (GDAS) edge computes only its sampled op, op 0 included, and gives
  every unsampled op weight the gradient ``sum(dL/d out)`` (``unsampled_weights``);
- a search cell weights a custom (non-``MixedOp``) edge by its own alpha row;
- a retrain cell concatenates exactly the genotype's ``concat`` nodes and drops edge
  outputs with the network's own drop-path probability;
- the auxiliary head pools 8x8 maps with the paper's 5x5 window at stride 3 and has the
  paper's bias-free convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.genotype import CellGenotype, Edge
from diffnas.supernet.cell import FixedCell, SearchCell
from diffnas.supernet.mixed import MixedOp
from diffnas.supernet.network import AuxiliaryHead, AuxPool

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- hard sampling on a mixed edge --------------------------------------------------------
def test_a_sampled_edge_runs_only_its_op_and_hands_unsampled_weights_the_output_gradient():
    """``active=0`` is a sample like any other (not "no sample"): only op 0 runs; its
    weight gets <g, op_0(x)>, every other weight gets sum(g) (GDAS's NAS-Bench-201
    edge: ``w_a * op_a(x) + (rest - rest.detach())``), float64."""
    ops = ["sep_conv_3x3", "skip_connect", "avg_pool_3x3", "max_pool_3x3"]
    torch.manual_seed(0)
    m = MixedOp(3, 1, ops).double()
    calls = []
    for k, op in enumerate(m.ops):
        op.register_forward_pre_hook(lambda mod, a, k=k: calls.append(k))
    x, g = _randn(2, 3, 5, 5, seed=1), _randn(2, 3, 5, 5, seed=2)
    for active in (0, 2):
        calls.clear()
        w = F.one_hot(torch.tensor(active), len(ops)).to(F64).requires_grad_()
        out = m(x, w, active)
        assert calls == [active]
        op_out = m.ops[active](x).detach()
        torch.testing.assert_close(out, op_out, rtol=0, atol=0)  # w_a = 1, the rest zero
        (out * g).sum().backward()
        want = torch.full((len(ops),), g.sum().item(), dtype=F64)
        want[active] = (g * op_out).sum()
        torch.testing.assert_close(w.grad, want, rtol=1e-10, atol=1e-10)


# --- search cells -------------------------------------------------------------------------
class _Scale(nn.Module):
    """A custom edge (not a MixedOp): x * (w_0 + 2 w_1)."""

    def forward(self, x, weights, active=None):
        return x * (weights[0] + 2.0 * weights[1])


def test_a_search_cell_weights_a_custom_edge_by_its_own_alpha_row():
    """Node 2 = e0(p0) + e1(p1), node 3 = e2(p0) + e3(p1) + e4(node 2); edge k reads
    alpha row k (a modifier's edge, such as partial channels, is not a MixedOp)."""
    torch.manual_seed(0)
    cell = SearchCell(2, 2, 2, 2, False, False, ["none", "skip_connect"],
                      mixed_op=lambda C, stride, cands: _Scale()).double()
    s0, s1 = _randn(2, 2, 4, 4, seed=1), _randn(2, 2, 4, 4, seed=2)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.0], [0.0, 3.0]], dtype=F64)
    c = w[:, 0] + 2.0 * w[:, 1]  # 1, 2, 1.5, 0.25, 6
    p0, p1 = cell.preprocess0(s0), cell.preprocess1(s1)
    n2 = c[0] * p0 + c[1] * p1
    n3 = c[2] * p0 + c[3] * p1 + c[4] * n2
    torch.testing.assert_close(cell(s0, s1, w), torch.cat([n2, n3], 1), rtol=1e-12, atol=1e-12)


# --- retrain cells ------------------------------------------------------------------------
def _fixed_cell(edges, concat):
    g = CellGenotype("normal", tuple(Edge(op, s, d) for op, s, d in edges), concat)
    torch.manual_seed(0)
    return FixedCell(g, 3, 3, 3, False, False).double()


def test_a_retrain_cell_concatenates_only_the_genotype_concat_nodes():
    """A genotype whose concat is node 3 alone: the cell's output is node 3 (C channels,
    multiplier 1), node 3 = node 2 + p0 = (p0 + p1) + p0 with skip connections."""
    cell = _fixed_cell([("skip_connect", 0, 2), ("skip_connect", 1, 2),
                        ("skip_connect", 2, 3), ("skip_connect", 0, 3)], (3,)).eval()
    s0, s1 = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2)
    p0, p1 = cell.preprocess0(s0), cell.preprocess1(s1)
    assert cell.multiplier == 1
    torch.testing.assert_close(cell(s0, s1), 2 * p0 + p1, rtol=1e-12, atol=1e-12)


def test_a_retrain_cell_drops_edge_outputs_with_the_given_probability():
    """Training mode, drop_prob 0.5: each non-identity edge output is, per sample, 0 or
    h / 0.5 (masks drawn edge by edge), float64 replay."""
    cell = _fixed_cell([("avg_pool_3x3", 0, 2), ("max_pool_3x3", 1, 2)], (2,)).train()
    s0, s1 = _randn(8, 3, 4, 4, seed=1), _randn(8, 3, 4, 4, seed=2)
    with torch.no_grad():
        h0, h1 = cell.ops[0](cell.preprocess0(s0)), cell.ops[1](cell.preprocess1(s1))
        torch.manual_seed(3)
        out = cell(s0, s1, 0.5)
        torch.manual_seed(3)
        m0 = torch.empty(8, 1, 1, 1, dtype=F64).bernoulli_(0.5)
        m1 = torch.empty(8, 1, 1, 1, dtype=F64).bernoulli_(0.5)
    assert 0 < m0.sum() < 8 and 0 < m1.sum() < 8  # the replay is not vacuous
    torch.testing.assert_close(out, h0 / 0.5 * m0 + h1 / 0.5 * m1, rtol=1e-12, atol=1e-12)


# --- the auxiliary head -------------------------------------------------------------------
def test_the_auxiliary_pool_on_8x8_maps_is_the_paper_5x5_window_at_stride_3():
    """2x2 output: the means of rows/columns 0-4 and 3-7 (overlapping windows)."""
    x = _randn(2, 3, 8, 8, seed=1)
    want = torch.stack([torch.stack([x[:, :, r:r + 5, c:c + 5].mean((2, 3)) for c in (0, 3)], -1)
                        for r in (0, 3)], -2)
    got = AuxPool()(x)
    assert got.shape == (2, 3, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_auxiliary_head_convolutions_have_no_bias():
    """DARTS: conv 1x1 C->128 and conv 2x2 128->768, both bias-free (BN follows), so the
    head has 128C + 2*128 + 768*128*4 + 2*768 + 768*classes + classes parameters."""
    C, classes = 5, 3
    head = AuxiliaryHead(C, classes)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [m.bias for m in convs] == [None, None]
    want = 128 * C + 2 * 128 + 768 * 128 * 4 + 2 * 768 + 768 * classes + classes
    assert sum(p.numel() for p in head.parameters()) == want
