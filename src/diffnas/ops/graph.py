"""Candidate ops of graph cells (the ``gnn`` space), in their own registry.

A graph op maps node states ``x`` of shape ``(N, C)`` to ``(N, C)`` given the graph's
edges: ``op(x, graph)``. Message passing is plain torch (``index_select`` gathers the
source states of the edges, ``index_add_`` sums them into the targets), so every op
runs on any device and takes second derivatives (second-order DARTS). The factory takes
the width ``C``.

- ``gcn``: ``A_hat x W`` with ``A_hat = D^-1/2 (A + I) D^-1/2`` (Kipf & Welling);
- ``sage``: ``x W_s + mean_{j in N(i)} x_j W_n`` (GraphSAGE-mean; neighbours exclude the
  node itself, a node without neighbours aggregates zero);
- ``gat``: 4-head graph attention (Velickovic et al.), each head ``C/4`` wide: softmax
  over the incoming edges of each target (self loop included) of
  ``LeakyReLU(a_s . W x_j + a_d . W x_i)``, heads concatenated;
- ``gin``: ``MLP((1 + eps) x_i + sum_{j in N(i)} x_j)`` with a learned ``eps`` (Xu et al.);
- ``linear``: ``x W``, no propagation (an MLP layer);
- ``skip_connect``: the identity; ``none``: exactly zero (skipped by the mixed op,
  excluded by discretization).

These are not in the CNN op registry: CNN factories have the signature ``(C, stride,
affine)`` and map feature maps to feature maps; graph ops also need the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.registry import Registry

GraphOpFactory = Callable[[int], nn.Module]
GRAPH_OPS: Registry[GraphOpFactory] = Registry("graph op")

#: The ``gnn`` space's default candidates (``none`` first).
GNN_OPS = ("none", "skip_connect", "linear", "gcn", "sage", "gat", "gin")
GAT_HEADS = 4


class Graph:
    """The edges of one graph, prepared once for message passing.

    ``edge_index`` ``(2, E)`` holds (source, target) pairs of a symmetric graph with one
    self loop per node (as :mod:`diffnas.data.graph` builds it)."""

    def __init__(self, edge_index: torch.Tensor, num_nodes: int) -> None:
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
        self.num_nodes = num_nodes
        self.src, self.dst = edge_index[0].long(), edge_index[1].long()
        if edge_index.numel() and not (0 <= int(edge_index.min())
                                       and int(edge_index.max()) < num_nodes):
            raise ValueError(f"edge_index names nodes outside 0..{num_nodes - 1}")
        loops = int((self.src == self.dst).sum())
        pairs = self.src * num_nodes + self.dst
        if loops != num_nodes or torch.unique(pairs).numel() != pairs.numel():
            raise ValueError(  # gcn's D^-1/2 (A+I) D^-1/2 and gat's self-attention need both
                f"edge_index must hold each edge once and one self loop per node: it has "
                f"{loops} self loops for {num_nodes} nodes and "
                f"{pairs.numel() - torch.unique(pairs).numel()} repeated edges "
                "(data.graph.symmetric_edges builds such an edge list)")
        deg = torch.bincount(self.dst, minlength=num_nodes).to(torch.get_default_dtype())
        inv_sqrt = deg.clamp(min=1).rsqrt()
        self.gcn_weight = inv_sqrt[self.src] * inv_sqrt[self.dst]  # D^-1/2 (A+I) D^-1/2
        loop = self.src == self.dst
        self.nbr_src, self.nbr_dst = self.src[~loop], self.dst[~loop]  # neighbours only
        nbr_deg = torch.bincount(self.nbr_dst, minlength=num_nodes).to(deg.dtype)
        self.inv_nbr_deg = 1.0 / nbr_deg.clamp(min=1)

    def to(self, device: torch.device | str) -> Graph:
        g = object.__new__(Graph)
        g.__dict__ = {k: v.to(device) if torch.is_tensor(v) else v
                      for k, v in self.__dict__.items()}
        return g

    def propagate(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
        """``out[i] = sum over edges (j -> i) of weight_e * x[j]``."""
        msg = x.index_select(0, src)
        if weight is not None:
            msg = msg * weight.to(x.dtype).unsqueeze(-1)
        return x.new_zeros(self.num_nodes, *x.shape[1:]).index_add_(0, dst, msg)

    def neighbour_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.propagate(x, self.nbr_src, self.nbr_dst)


class GraphOp(nn.Module):
    """Base class: ``forward(x, graph)``. ``dropped_input``: the cell feeds this op the
    dropped-out node state (every op with weights); False for the identity."""

    dropped_input = True

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        raise NotImplementedError


class Zero(GraphOp):
    dropped_input = False

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        return x.mul(0.0)  # exactly zero, still a function of x (as the CNN op)


class Identity(GraphOp):
    dropped_input = False

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        return x


class Linear(GraphOp):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        return self.lin(x)


class GCN(GraphOp):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        return self.lin(graph.propagate(x, graph.src, graph.dst, graph.gcn_weight))


class SAGE(GraphOp):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.lin_self = nn.Linear(C, C)
        self.lin_nbr = nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        mean = graph.neighbour_sum(x) * graph.inv_nbr_deg.to(x.dtype).unsqueeze(-1)
        return self.lin_self(x) + self.lin_nbr(mean)


class GAT(GraphOp):
    def __init__(self, C: int, heads: int = GAT_HEADS) -> None:
        super().__init__()
        if C % heads:
            raise ValueError(f"gat: width {C} does not divide into {heads} heads")
        self.heads, self.head_dim = heads, C // heads
        self.lin = nn.Linear(C, C, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, self.head_dim))
        self.att_dst = nn.Parameter(torch.empty(heads, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(C))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        n = x.shape[0]
        h = self.lin(x).view(n, self.heads, self.head_dim)
        a_src = (h * self.att_src).sum(-1)  # (N, heads)
        a_dst = (h * self.att_dst).sum(-1)
        e = F.leaky_relu(a_src.index_select(0, graph.src) + a_dst.index_select(0, graph.dst),
                         0.2)  # (E, heads)
        with torch.no_grad():  # softmax is shift invariant: the per-target max is a constant
            top = e.new_full((n, self.heads), float("-inf")).scatter_reduce_(
                0, graph.dst.unsqueeze(-1).expand_as(e), e, "amax")
        p = (e - top.index_select(0, graph.dst)).exp()
        denom = p.new_zeros(n, self.heads).index_add_(0, graph.dst, p)
        att = p / denom.index_select(0, graph.dst)
        msg = h.index_select(0, graph.src) * att.unsqueeze(-1)
        out = h.new_zeros(n, self.heads, self.head_dim).index_add_(0, graph.dst, msg)
        return out.reshape(n, -1) + self.bias


class GIN(GraphOp):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.zeros(()))
        self.mlp = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))

    def forward(self, x: torch.Tensor, graph: Graph) -> torch.Tensor:
        return self.mlp((1 + self.eps) * x + graph.neighbour_sum(x))


def register_graph_op(name: str) -> Callable[[GraphOpFactory], GraphOpFactory]:
    return GRAPH_OPS.register(name)


register_graph_op("none")(lambda C: Zero())
register_graph_op("skip_connect")(lambda C: Identity())
register_graph_op("linear")(Linear)
register_graph_op("gcn")(GCN)
register_graph_op("sage")(SAGE)
register_graph_op("gat")(GAT)
register_graph_op("gin")(GIN)


def create_graph_op(name: str, C: int) -> GraphOp:
    """Build graph op ``name`` of width ``C``; unknown names raise with the known ones."""
    return GRAPH_OPS.get(name)(C)


def list_graph_ops() -> list[str]:
    return GRAPH_OPS.names()
