"""A small graph convolutional encoder of NAS-Bench-201 cells (op nodes, see
:func:`diffnas.nasbench.encoding.graph_arrays`), shared by the GCN predictor and the
comparator. Messages flow along the DAG and against it (as in Wen et al.'s neural
predictor); the graph embedding is the mean of the node states."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.encoding import NODE_FEATURES, all_cells_array, graph_arrays


def normalized(A: torch.Tensor) -> torch.Tensor:
    """Row-normalized ``A + I``."""
    A = A + torch.eye(A.shape[-1], dtype=A.dtype)
    return A / A.sum(-1, keepdim=True)


def graph_tensors(cells: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward adjacency (a node averages its predecessors), backward adjacency, features."""
    A, X = graph_arrays(cells)
    A = torch.from_numpy(A)
    # A[i, j] = edge i -> j; node j gathers from i, so the forward operator is A^T.
    return normalized(A.transpose(1, 2)), normalized(A), torch.from_numpy(X)


@lru_cache(maxsize=1)
def space_graph_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graph tensors of every cell of the space (row = cell code)."""
    return graph_tensors(all_cells_array())


class GraphEncoder(nn.Module):
    def __init__(self, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        dims = [NODE_FEATURES] + [hidden] * layers
        self.fwd = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.bwd = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, A_f: torch.Tensor, A_b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        h = X
        for f, b in zip(self.fwd, self.bwd, strict=True):
            h = torch.relu(0.5 * (A_f @ f(h) + A_b @ b(h)))
        return h.mean(1)
