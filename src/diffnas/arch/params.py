"""Architecture parameters (alpha): one row of logits per edge, one tensor per cell type.

They live here, never inside the supernet, so weights and architecture parameters are two
disjoint parameter sets with two optimizers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from diffnas.spaces.base import EdgeSpec, SearchSpace

if TYPE_CHECKING:
    from diffnas.arch.relax import ArchWeights


class ArchParams(nn.Module):
    """Logits keyed by cell type: ``self[group]`` has shape ``(num_edges, num_ops)``.

    Row ``i`` of group ``g`` belongs to ``self.edges[g][i]`` (an :class:`EdgeSpec`).
    """

    def __init__(
        self, space: SearchSpace, init_std: float = 1e-3, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.edges: dict[str, list[EdgeSpec]] = space.edge_groups()
        self.logits = nn.ParameterDict()
        for group, edges in self.edges.items():
            n_ops = len(edges[0].candidates)
            if any(len(e.candidates) != n_ops for e in edges):
                raise ValueError(f"edges of group {group!r} must share one candidate list")
            init = init_std * torch.randn(len(edges), n_ops, generator=generator)
            self.logits[group] = nn.Parameter(init)
        #: PC-DARTS edge-normalization logits (one per edge), only after add_edge_betas().
        self.betas = nn.ParameterDict()

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.logits[group]

    def groups(self) -> list[str]:
        return list(self.logits.keys())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {g: self.logits[g] for g in self.logits}

    def candidates(self, group: str) -> tuple[str, ...]:
        return self.edges[group][0].candidates

    # --- edge normalization (PC-DARTS betas) -------------------------------------------
    def add_edge_betas(self) -> None:
        """Give every edge a beta logit (zeros, so it adds no RNG draw). Node ``j`` then
        weighs its incoming edges by ``softmax(beta)`` over those edges. Idempotent."""
        for group, edges in self.edges.items():
            if group not in self.betas:
                ref = self.logits[group]
                self.betas[group] = nn.Parameter(ref.new_zeros(len(edges)))

    def edge_weights(self) -> dict[str, torch.Tensor]:
        """Per group, ``softmax(beta)`` over the incoming edges of each node, shape
        ``(num_edges,)``; empty when there are no betas."""
        out = {}
        for group, beta in self.betas.items():
            dst = torch.tensor([e.dst for e in self.edges[group]], device=beta.device)
            w = torch.zeros_like(beta)
            for node in dst.unique().tolist():
                mask = dst == node
                w = w.masked_scatter(mask, torch.softmax(beta[mask], dim=0))
            out[group] = w
        return out

    def normalize(self, arch_weights: ArchWeights) -> ArchWeights:
        """Scale each edge's op weights by its edge weight (identity without betas). The
        mixed op is linear in its weights, so this equals weighting the edge's output."""
        if len(self.betas) == 0:
            return arch_weights
        scale = self.edge_weights()
        weights = {
            g: w * scale[g].unsqueeze(-1) if g in scale else w
            for g, w in arch_weights.weights.items()
        }
        return type(arch_weights)(weights, arch_weights.active)
